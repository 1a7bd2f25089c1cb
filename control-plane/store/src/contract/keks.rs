//! KEKs, their counts and the rotation jobs that re-wrap them
//! ([`KekStore`](crate::KekStore)).

use super::*;

/// A KEK is stored once per resource and org: inserting another for the same
/// resource returns the stored one; a stale org version is refused and
/// writes nothing.
pub async fn keks_are_stored_once_per_resource(store: &dyn Store) {
    const CHECK: u32 = 9;
    let org = org_id("keks");
    let other = org_id("keks-other");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-a", KeyState::Active), ("k-b", KeyState::Pending)],
    )
    .await;
    org_with_keys(store, CHECK, &other, &[("k-a", KeyState::Active)]).await;

    let first = kek(CHECK, 1, "space:1/meeting-1", "k-a");
    async fn created(store: &dyn Store, org: &OrgId) -> usize {
        store
            .audit_events(org, 0, 1000)
            .await
            .expect("audit_events")
            .into_iter()
            .filter(|e| e.event.action.starts_with("create KEK"))
            .count()
    }
    let before = created(store, &org).await;
    assert_eq!(
        store
            .insert_kek(&org, version, first.clone(), vec![event("create KEK 1")])
            .await
            .expect("insert_kek"),
        first
    );
    assert_eq!(
        created(store, &org).await,
        before + 1,
        "audited with the KEK"
    );
    assert_eq!(
        store.kek(&org, &first.id).await.expect("kek"),
        Some(first.clone()),
        "every field reads back as written"
    );

    // Another KEK for the same resource (a racing caller, or a retry that
    // drew a new id): the stored one is returned and nothing is written.
    let same_resource = kek(CHECK, 2, "space:1/meeting-1", "k-b");
    assert_eq!(
        store
            .insert_kek(
                &org,
                version,
                same_resource.clone(),
                vec![event("create KEK 2")]
            )
            .await
            .expect("insert_kek again"),
        first
    );
    assert_eq!(
        created(store, &org).await,
        before + 1,
        "nothing written, not even the event"
    );
    assert_eq!(store.kek(&org, &same_resource.id).await.expect("kek"), None);

    // The org's keys change: a KEK wrapped by the key chosen before is refused.
    let version = store
        .commit(commit(&org, Some(version), Vec::new(), Vec::new()))
        .await
        .expect("commit");
    let late = kek(CHECK, 3, "space:1/meeting-2", "k-a");
    for stale in [version - 1, version + 1, u64::MAX] {
        match store
            .insert_kek(&org, stale, late.clone(), Vec::new())
            .await
        {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("insert_kek at version {stale} of {version}: {other:?}"),
        }
        assert_eq!(store.kek(&org, &late.id).await.expect("kek"), None);
    }
    // Nothing would be written for a resource that has its KEK, so even a
    // stale version gets it back: a retry after a lost reply is harmless.
    assert_eq!(
        store
            .insert_kek(&org, version - 1, same_resource.clone(), Vec::new())
            .await
            .expect("insert_kek of a stored resource at a stale version"),
        first
    );
    assert_eq!(
        store
            .insert_kek(&org, version, late.clone(), Vec::new())
            .await
            .expect("insert_kek at the current version"),
        late
    );

    // KEKs belong to their org: another org neither sees them nor shares
    // their resources.
    assert_eq!(store.kek(&other, &first.id).await.expect("kek"), None);
    let others = kek(CHECK, 4, "space:1/meeting-1", "k-a");
    assert_eq!(
        store
            .insert_kek(&other, 1, others.clone(), Vec::new())
            .await
            .expect("insert_kek in another org"),
        others
    );
    assert_eq!(
        store.kek(&org, &kek_id(CHECK, 99)).await.expect("kek"),
        None
    );

    // An org that does not exist has no version to match.
    let never = org_id("keks-never");
    assert!(matches!(
        store
            .insert_kek(&never, 1, kek(CHECK, 5, "space:2", "k-a"), Vec::new())
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.kek(&never, &kek_id(CHECK, 5)).await.expect("kek"),
        None
    );
}

/// `kek_counts` lists each key that wraps a KEK, with how many, in key id order.
pub async fn kek_counts_count_each_keys_keks(store: &dyn Store) {
    const CHECK: u32 = 10;
    let org = org_id("kek-counts");
    let version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-b", KeyState::Active),
            ("k-a", KeyState::Rotating),
            ("k-c", KeyState::Pending),
        ],
    )
    .await;
    assert!(store.kek_counts(&org).await.expect("kek_counts").is_empty());
    // Inserted in an order that is not the key order.
    for (n, key) in (1..).zip(["k-b", "k-a", "k-b", "k-b", "k-a"]) {
        store
            .insert_kek(
                &org,
                version,
                kek(CHECK, n, &format!("r-{n}"), key),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-a".into()), 2), (KeyId("k-b".into()), 3)],
        "keys that wrap nothing are absent"
    );
    assert!(
        store
            .kek_counts(&org_id("kek-counts-never"))
            .await
            .expect("kek_counts of an unknown org")
            .is_empty()
    );
}

/// Paging through the KEKs not wrapped by a key yields each of them exactly
/// once, in id order, and nothing of another org.
pub async fn pages_of_keks_not_wrapped_by_a_key_cover_each_once(store: &dyn Store) {
    const CHECK: u32 = 11;
    let org = org_id("kek-pages");
    let other = org_id("kek-pages-other");
    let keys = [
        ("k-new", KeyState::Active),
        ("k-old", KeyState::Rotating),
        ("k-older", KeyState::Rotating),
    ];
    let version = org_with_keys(store, CHECK, &org, &keys).await;
    let other_version = org_with_keys(store, CHECK, &other, &keys).await;
    // Ids inserted out of order, wrapped by a mix of keys; all even, so that
    // the other org's odd ones fall between them.
    let mut expected = Vec::new();
    for n in [7, 3, 11, 1, 9, 4, 12, 2, 8, 5, 10, 6] {
        let key = match n % 3 {
            0 => "k-new",
            1 => "k-old",
            _ => "k-older",
        };
        let kek = kek(CHECK, 2 * n, &format!("space:{n}"), key);
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
        if key != "k-new" {
            expected.push(kek);
        }
    }
    for n in [1, 9, 25] {
        store
            .insert_kek(
                &other,
                other_version,
                kek(CHECK, n, "space:1", "k-old"),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }
    expected.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(expected.len(), 8);

    for limit in [1, 3, 8, 100] {
        assert_eq!(
            all_not_wrapped_by(store, &org, "k-new", limit).await,
            expected,
            "pages of {limit}"
        );
    }
    assert!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), None, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
    assert_eq!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), Some(&expected[5].id), 2)
            .await
            .expect("page after an id"),
        expected[6..8].to_vec()
    );
    // `after` need not be a KEK that matches, or one that exists.
    assert_eq!(
        store
            .keks_not_wrapped_by(&org, &KeyId("k-new".into()), Some(&kek_id(CHECK, 6)), 100)
            .await
            .expect("page after a KEK wrapped by the target")
            .first()
            .map(|k| k.id.clone()),
        Some(kek_id(CHECK, 8))
    );
    assert!(
        store
            .keks_not_wrapped_by(
                &org,
                &KeyId("k-new".into()),
                Some(&KekId::from_random([0xff; 16])),
                100
            )
            .await
            .expect("page after every id")
            .is_empty()
    );
    // A key the org does not have wraps nothing, so every KEK is listed.
    assert_eq!(all_not_wrapped_by(store, &org, "k-none", 5).await.len(), 12);
}

/// Starting a job counts the KEKs not wrapped by its target and supersedes
/// the org's running job; only the running job can be finished.
pub async fn rotation_jobs_start_supersede_and_finish(store: &dyn Store) {
    const CHECK: u32 = 12;
    let org = org_id("rotation-jobs");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-1", KeyState::Active),
            ("k-2", KeyState::Pending),
            ("k-3", KeyState::Pending),
        ],
    )
    .await;
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        None
    );
    for n in 1..=5 {
        let key = if n <= 3 { "k-1" } else { "k-2" };
        store
            .insert_kek(
                &org,
                version,
                kek(CHECK, n, &format!("r-{n}"), key),
                Vec::new(),
            )
            .await
            .expect("insert_kek");
    }

    version = store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 100))
        .await
        .expect("start");
    let first = RotationJob {
        org: org.clone(),
        id: 1,
        target: KeyId("k-2".into()),
        from: vec![KeyId("k-1".into())],
        total: 3,
        done: 0,
        started_at: Timestamp(100),
        ended_at: None,
        state: JobState::Running,
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(first.clone()),
        "the total counts the KEKs not wrapped by the target"
    );
    assert!(
        running_of(store, &org).await == vec![first.clone()],
        "a started job is running"
    );

    // A newer activation supersedes it.
    version = store
        .commit(start_rotation(&org, version, "k-3", &["k-2", "k-1"], 200))
        .await
        .expect("start again");
    let second = RotationJob {
        id: 2,
        target: KeyId("k-3".into()),
        from: vec![KeyId("k-2".into()), KeyId("k-1".into())],
        total: 5,
        started_at: Timestamp(200),
        ..first.clone()
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(second.clone())
    );
    assert_eq!(running_of(store, &org).await, vec![second.clone()]);

    // Only the running job can finish; a refused finish writes nothing.
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;
    for job in [1, 3, u64::MAX] {
        match store.commit(finish_rotation(&org, version, job, 300)).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("finishing job {job}: {other:?}"),
        }
        assert_eq!(store.load_org(&org).await.expect("load_org"), before);
        assert_eq!(chain_of(store, &org).await, chain_before);
        assert_eq!(
            store.latest_rotation(&org).await.expect("latest_rotation"),
            Some(second.clone())
        );
    }
    version = store
        .commit(finish_rotation(&org, version, 2, 300))
        .await
        .expect("finish");
    let finished = RotationJob {
        state: JobState::Finished,
        ended_at: Some(Timestamp(300)),
        ..second.clone()
    };
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        Some(finished)
    );
    assert!(running_of(store, &org).await.is_empty());
    assert!(
        matches!(
            store.commit(finish_rotation(&org, version, 2, 400)).await,
            Err(StoreError::Conflict(_))
        ),
        "a finished job cannot finish again"
    );

    // Numbering goes on after a finished job, and a start with no KEK to
    // re-wrap still makes a job (with nothing to do).
    let empty = org_id("rotation-jobs-empty");
    let empty_version = org_with_keys(
        store,
        CHECK,
        &empty,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    store
        .commit(start_rotation(&empty, empty_version, "k-2", &[], 500))
        .await
        .expect("start without KEKs");
    store
        .commit(start_rotation(&org, version, "k-1", &["k-3"], 600))
        .await
        .expect("start after finishing");
    let third = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("a job");
    assert_eq!((third.id, third.total, third.from.len()), (3, 2, 1));
    let empty_job = store
        .latest_rotation(&empty)
        .await
        .expect("latest_rotation")
        .expect("a job");
    assert_eq!((empty_job.id, empty_job.total), (1, 0));
    assert!(empty_job.from.is_empty());

    // Running jobs are listed by org id.
    let running = store.running_rotations().await.expect("running_rotations");
    assert!(
        running.windows(2).all(|w| w[0].org < w[1].org),
        "one running job per org, in org id order: {running:?}"
    );
    let mine: Vec<&RotationJob> = running
        .iter()
        .filter(|j| j.org == org || j.org == empty)
        .collect();
    assert_eq!(mine, vec![&third, &empty_job]);
}

/// The org's running jobs among all running ones.
async fn running_of(store: &dyn Store, org: &OrgId) -> Vec<RotationJob> {
    store
        .running_rotations()
        .await
        .expect("running_rotations")
        .into_iter()
        .filter(|j| &j.org == org)
        .collect()
}

/// A re-wrap is written only if the KEK is still wrapped by the key it was
/// read under, and only written ones are counted in the job's progress.
pub async fn rewraps_apply_only_where_the_key_is_unchanged(store: &dyn Store) {
    const CHECK: u32 = 13;
    let org = org_id("rewrap-cas");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-old", KeyState::Active),
            ("k-new", KeyState::Pending),
            ("k-other", KeyState::Pending),
        ],
    )
    .await;
    let keks: Vec<StoredKek> = (1..=6)
        .map(|n| kek(CHECK, n, &format!("r-{n}"), "k-old"))
        .collect();
    for kek in &keks {
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
    }
    version = store
        .commit(start_rotation(&org, version, "k-new", &["k-old"], 10))
        .await
        .expect("start");

    // Read under k-old; meanwhile KEK 2 was re-wrapped elsewhere to k-other.
    let raced = rewrap(&keks[1], "k-other");
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, vec![raced.clone()])
            .await
            .expect("rewrap"),
        1
    );
    let batch: Vec<Rewrap> = keks[..4].iter().map(|k| rewrap(k, "k-new")).collect();
    let mut with_unknown = batch.clone();
    with_unknown.push(Rewrap {
        kek: kek_id(CHECK, 99),
        ..rewrap(&keks[0], "k-new")
    });
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, with_unknown)
            .await
            .expect("rewrap"),
        3,
        "a KEK no longer wrapped by `from`, and one that does not exist, are skipped"
    );
    for (i, kek) in keks[..4].iter().enumerate() {
        let expected = if i == 1 {
            rewrapped(kek, &raced)
        } else {
            rewrapped(kek, &batch[i])
        };
        assert_eq!(
            store.kek(&org, &kek.id).await.expect("kek"),
            Some(expected),
            "KEK {i}"
        );
    }
    assert_eq!(
        store.kek(&org, &kek_id(CHECK, 99)).await.expect("kek"),
        None
    );

    // Repeating the batch (a retry after a lost reply) writes and counts nothing.
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, batch.clone())
            .await
            .expect("rewrap again"),
        0
    );
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, Vec::new())
            .await
            .expect("rewrap nothing"),
        0
    );
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.total, job.done), (6, 4));
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![
            (KeyId("k-new".into()), 3),
            (KeyId("k-old".into()), 2),
            (KeyId("k-other".into()), 1),
        ]
    );
    assert_eq!(
        all_not_wrapped_by(store, &org, "k-new", 10).await,
        vec![
            rewrapped(&keks[1], &raced),
            keks[4].clone(),
            keks[5].clone()
        ]
    );
}

/// A re-wrap batch is refused whole, writing nothing, if the org changed
/// since it was read or its job is no longer running.
pub async fn rewraps_conflict_on_a_stale_version_or_a_job_not_running(store: &dyn Store) {
    const CHECK: u32 = 14;
    let org = org_id("rewrap-conflict");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[
            ("k-1", KeyState::Active),
            ("k-2", KeyState::Pending),
            ("k-3", KeyState::Pending),
        ],
    )
    .await;
    let keks: Vec<StoredKek> = (1..=2)
        .map(|n| kek(CHECK, n, &format!("r-{n}"), "k-1"))
        .collect();
    for kek in &keks {
        store
            .insert_kek(&org, version, kek.clone(), Vec::new())
            .await
            .expect("insert_kek");
    }
    version = store
        .commit(start_rotation(&org, version, "k-2", &["k-1"], 10))
        .await
        .expect("start");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-2")).collect();

    let assert_untouched = |why: &'static str| {
        let org = org.clone();
        let keks = keks.clone();
        async move {
            for kek in &keks {
                assert_eq!(
                    store.kek(&org, &kek.id).await.expect("kek"),
                    Some(kek.clone()),
                    "{why}"
                );
            }
        }
    };

    for stale in [version - 1, version + 1, u64::MAX] {
        match store.rewrap_keks(&org, stale, 1, batch.clone()).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("rewrap at version {stale} of {version}: {other:?}"),
        }
        assert_untouched("a stale version writes nothing").await;
    }
    for job in [0, 2, u64::MAX] {
        assert!(
            matches!(
                store.rewrap_keks(&org, version, job, batch.clone()).await,
                Err(StoreError::Conflict(_))
            ),
            "job {job} does not exist"
        );
        assert_untouched("an unknown job writes nothing").await;
    }

    // Superseded: job 1 is no longer running.
    version = store
        .commit(start_rotation(&org, version, "k-3", &["k-1", "k-2"], 20))
        .await
        .expect("start again");
    assert!(matches!(
        store.rewrap_keks(&org, version, 1, batch.clone()).await,
        Err(StoreError::Conflict(_))
    ));
    assert_untouched("a superseded job writes nothing").await;

    // Finished: job 2 is no longer running either.
    version = store
        .commit(finish_rotation(&org, version, 2, 30))
        .await
        .expect("finish");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-3")).collect();
    assert!(matches!(
        store.rewrap_keks(&org, version, 2, batch).await,
        Err(StoreError::Conflict(_))
    ));
    assert_untouched("a finished job writes nothing").await;
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.id, job.done), (2, 0));

    // Another org's job is not this org's.
    let other = org_id("rewrap-conflict-other");
    let other_version = org_with_keys(
        store,
        CHECK,
        &other,
        &[("k-1", KeyState::Active), ("k-2", KeyState::Pending)],
    )
    .await;
    let other_version = store
        .commit(start_rotation(&other, other_version, "k-2", &["k-1"], 40))
        .await
        .expect("start in another org");
    let batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-2")).collect();
    assert_eq!(
        store
            .rewrap_keks(&other, other_version, 1, batch)
            .await
            .expect("rewrap in another org"),
        0,
        "KEKs of another org are not re-wrapped"
    );
    assert_untouched("KEKs of another org are not re-wrapped").await;
}

/// A commit that requires a key to wrap no KEK fails, writing nothing, while
/// one still does.
pub async fn keys_still_wrapping_keks_cannot_be_required_unreferenced(store: &dyn Store) {
    const CHECK: u32 = 15;
    let org = org_id("unreferenced");
    let mut version = org_with_keys(
        store,
        CHECK,
        &org,
        &[("k-old", KeyState::Rotating), ("k-new", KeyState::Active)],
    )
    .await;
    let held = kek(CHECK, 1, "r-1", "k-old");
    store
        .insert_kek(&org, version, held.clone(), Vec::new())
        .await
        .expect("insert_kek");
    version = store
        .commit(start_rotation(&org, version, "k-new", &["k-old"], 10))
        .await
        .expect("start");

    // Everything a commit can carry, so that any part written despite the
    // refusal shows.
    let deactivate = |version| Commit {
        require_unreferenced: vec![KeyId("k-new".into()), KeyId("k-old".into())],
        rotation: Some(RotationChange::Finish {
            job: 1,
            at: Timestamp(20),
        }),
        add_intents: vec![intent(
            handle(CHECK, 1),
            IntentKind::Destroy,
            Some(&org),
            20,
        )],
        ..commit(
            &org,
            Some(version),
            vec![key_in(
                "k-old",
                handle(CHECK, 1000),
                KeyState::Deactivated {
                    remove_at: Timestamp(1),
                },
            )],
            vec![event("deactivate")],
        )
    };
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;
    match store.commit(deactivate(version)).await {
        Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
        other => panic!("k-old still wraps a KEK: {other:?}"),
    }
    assert_eq!(store.load_org(&org).await.expect("load_org"), before);
    assert_eq!(chain_of(store, &org).await, chain_before);
    assert!(open_among(store, &[handle(CHECK, 1)]).await.is_empty());
    assert_eq!(
        store
            .latest_rotation(&org)
            .await
            .expect("latest_rotation")
            .map(|j| j.state),
        Some(JobState::Running)
    );

    // Once the last KEK is re-wrapped away, the same change commits.
    assert_eq!(
        store
            .rewrap_keks(&org, version, 1, vec![rewrap(&held, "k-new")])
            .await
            .expect("rewrap"),
        1
    );
    let Err(StoreError::Conflict(_)) = store
        .commit(Commit {
            require_unreferenced: vec![KeyId("k-new".into())],
            ..deactivate(version)
        })
        .await
    else {
        panic!("k-new now wraps the KEK");
    };
    version = store
        .commit(Commit {
            require_unreferenced: vec![KeyId("k-old".into()), KeyId("k-unknown".into())],
            ..deactivate(version)
        })
        .await
        .expect("deactivate");
    let loaded = store.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!(loaded.version, version);
    assert!(loaded.keys.iter().any(
        |k| k.record.id.0 == "k-old" && matches!(k.record.state, KeyState::Deactivated { .. })
    ));
    assert_eq!(
        store
            .latest_rotation(&org)
            .await
            .expect("latest_rotation")
            .map(|j| j.state),
        Some(JobState::Finished)
    );
    store
        .resolve_intent(&handle(CHECK, 1))
        .await
        .expect("resolve_intent");
}

/// Two instances inserting a KEK for one resource at once both get the same
/// stored KEK; only it is counted, and only its event is appended.
pub async fn keks_racing_for_one_resource_are_stored_once(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 20;
    const RESOURCES: u32 = 10;
    let org = org_id("kek-race");
    let version = org_with_keys(a, CHECK, &org, &[("k-1", KeyState::Active)]).await;
    for n in 0..RESOURCES {
        let resource = format!("space:{n}");
        let mine = kek(CHECK, 2 * n, &resource, "k-1");
        let theirs = kek(CHECK, 2 * n + 1, &resource, "k-1");
        let (x, y) = tokio::join!(
            a.insert_kek(&org, version, mine.clone(), vec![event("create KEK")]),
            b.insert_kek(&org, version, theirs.clone(), vec![event("create KEK")]),
        );
        let (x, y) = (x.expect("insert_kek on a"), y.expect("insert_kek on b"));
        assert_eq!(x, y, "both callers get the one stored KEK");
        assert!(x == mine || x == theirs);
    }
    assert_eq!(
        a.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-1".into()), u64::from(RESOURCES))]
    );
    let rows = chain_of(b, &org).await;
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    assert_eq!(rows.len(), RESOURCES as usize, "one event per stored KEK");
}

/// A commit requiring a key to wrap no KEK, racing a KEK inserted under that
/// key from another instance: one of them is refused, so the key never ends
/// up deactivated with a KEK that needs it.
pub async fn a_key_required_unreferenced_gains_no_kek_meanwhile(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 21;
    for round in 0..10 {
        let org = org_id(&format!("unreferenced-race-{round}"));
        let version = org_with_keys(
            a,
            CHECK,
            &org,
            &[("k-old", KeyState::Rotating), ("k-new", KeyState::Active)],
        )
        .await;
        let deactivate = Commit {
            require_unreferenced: vec![KeyId("k-old".into())],
            ..commit(&org, Some(version), Vec::new(), vec![event("deactivate")])
        };
        let late = kek(CHECK, round, "space:1", "k-old");
        let (deactivated, inserted) = tokio::join!(
            a.commit(deactivate),
            b.insert_kek(&org, version, late, Vec::new()),
        );
        let wraps: Vec<(KeyId, u64)> = b.kek_counts(&org).await.expect("kek_counts");
        match (deactivated, inserted) {
            (Ok(_), Err(StoreError::Conflict(_))) => assert!(wraps.is_empty()),
            (Err(StoreError::Conflict(_)), Ok(_)) => {
                assert_eq!(wraps, vec![(KeyId("k-old".into()), 1)]);
            }
            other => panic!("round {round}: exactly one must be refused: {other:?}"),
        }
    }
}

/// Batches larger than one statement of either backend are written whole:
/// `seed` stores KEKs without checks (each backend's `insert_keks_unchecked`),
/// and one re-wrap batch mixes several (from, to) pairs, a KEK re-wrapped
/// twice along a chain, a stale `from` and a no-op. Returns the org, so that
/// the caller can compare `kek_counts` with a count of the KEKs themselves.
pub async fn large_batches_are_written_whole_and_counted_exactly<F, Fut>(
    store: &dyn Store,
    seed: F,
) -> OrgId
where
    F: FnOnce(OrgId, Vec<StoredKek>) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    const CHECK: u32 = 23;
    const KEKS: u32 = 1203;
    let org = org_id("large-batches");
    let keys = [
        ("k-1", KeyState::Rotating),
        ("k-2", KeyState::Rotating),
        ("k-3", KeyState::Active),
    ];
    let version = org_with_keys(store, CHECK, &org, &keys).await;
    // Not a multiple of any backend's rows per statement, and in no
    // particular order.
    let keks: Vec<StoredKek> = (0..KEKS)
        .rev()
        .map(|n| {
            let key = if n % 3 == 0 { "k-2" } else { "k-1" };
            kek(CHECK, n, &format!("space:{n}"), key)
        })
        .collect();
    seed(org.clone(), keks.clone()).await.expect("seed KEKs");
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![(KeyId("k-1".into()), 802), (KeyId("k-2".into()), 401)]
    );
    let version = store
        .commit(start_rotation(&org, version, "k-3", &["k-1", "k-2"], 10))
        .await
        .expect("start rotation");

    let mut batch: Vec<Rewrap> = keks.iter().map(|k| rewrap(k, "k-3")).collect();
    let chained = &keks[1];
    assert_eq!(chained.key.0, "k-1");
    batch[1] = rewrap(chained, "k-2");
    batch.push(Rewrap {
        from: KeyId("k-2".into()),
        ..rewrap(chained, "k-3")
    });
    let stale = &keks[2];
    batch[2] = Rewrap {
        from: KeyId("k-3".into()),
        ..rewrap(stale, "k-3")
    };
    let unchanged = &keks[4];
    batch[4] = rewrap(unchanged, "k-1");
    let written = store
        .rewrap_keks(&org, version, 1, batch)
        .await
        .expect("rewrap_keks");
    // Every KEK but the stale one, plus the chained KEK's second step.
    assert_eq!(written, u64::from(KEKS) - 1 + 1);
    // The stale KEK stays with k-2, the no-op one with k-1.
    assert_eq!(
        (stale.key.0.as_str(), unchanged.key.0.as_str()),
        ("k-2", "k-1")
    );
    assert_eq!(
        store.kek_counts(&org).await.expect("kek_counts"),
        vec![
            (KeyId("k-1".into()), 1),
            (KeyId("k-2".into()), 1),
            (KeyId("k-3".into()), u64::from(KEKS) - 2),
        ]
    );
    assert_eq!(
        store.kek(&org, &chained.id).await.expect("kek"),
        Some(rewrapped(
            chained,
            &Rewrap {
                from: KeyId("k-2".into()),
                ..rewrap(chained, "k-3")
            }
        )),
        "the chained KEK ends with its second step"
    );
    assert_eq!(all_not_wrapped_by(store, &org, "k-3", 1000).await.len(), 2);
    let job = store
        .latest_rotation(&org)
        .await
        .expect("latest_rotation")
        .expect("job");
    assert_eq!((job.total, job.done), (u64::from(KEKS), written));
    org
}
