//! An org's keys and settings: load, commit, and the store-wide key queries
//! ([`OrgStore`](crate::OrgStore)).

use super::*;

/// An org never committed loads as `None` and has no audit events.
pub async fn unknown_org_loads_as_none(store: &dyn Store) {
    let org = org_id("unknown");
    assert_eq!(store.load_org(&org).await.expect("load_org"), None);
    assert!(chain_of(store, &org).await.is_empty());
}

/// Every field of every state and source reads back as written, keys in the
/// order added; an update keeps a key's place.
pub async fn create_and_load_round_trip_every_field(store: &dyn Store) {
    const CHECK: u32 = 1;
    let org = org_id("round-trip");
    // The extremes of the range survive too.
    let states = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::Rotating,
        KeyState::Deactivated {
            remove_at: Timestamp(i64::MAX),
        },
        KeyState::Revoked,
        KeyState::Deleted {
            restore_until: Timestamp(1_700_086_405),
        },
        KeyState::Lost,
        KeyState::RevokedByProvider {
            was: Place::Deactivated {
                remove_at: Timestamp(1_700_086_407),
            },
        },
    ];
    let sources = [
        KeySource::Uploaded,
        KeySource::AwsKms,
        KeySource::GenericDefault,
    ];
    // Ids deliberately out of lexical order: keys come back in the order added.
    let ids = ["k-7", "k-2", "k-5", "k-0", "k-6", "k-1", "k-4", "k-3"];
    let keys: Vec<StoredKey> = (0u32..)
        .zip(ids.iter().zip(states))
        .map(|(i, (id, state))| {
            let n = i64::from(i);
            let some_when = |offset: i64| (i % 2 == 0).then_some(Timestamp(1_700_000_000 + offset));
            StoredKey {
                record: KeyRecord {
                    id: KeyId((*id).into()),
                    source: sources[i as usize % sources.len()],
                    state,
                    check_value: format!("{:06x}", 0xa1b2c3 + n),
                    // The extremes of the range survive too.
                    created_at: Timestamp(match i {
                        0 => i64::MIN,
                        1 => -1,
                        2 => 0,
                        _ => 1_600_000_000 + n,
                    }),
                    activated_at: some_when(n),
                    revoked_at: (i % 3 == 0).then_some(Timestamp(1_700_000_500 + n)),
                },
                handle: handle(CHECK, i),
                // Every shape: none, the key alone, all three, and a role
                // without a backup key.
                aws: match i % 4 {
                    0 => None,
                    1 => aws_key(id, String::new(), false).aws,
                    2 => aws_key(id, String::new(), true).aws,
                    _ => aws_key(id, String::new(), true).aws.map(|arns| AwsArns {
                        backup_key_arn: None,
                        ..arns
                    }),
                },
            }
        })
        .collect();

    let mut created = commit(&org, None, keys.clone(), Vec::new());
    created.byok = true;
    assert_eq!(store.commit(created).await.expect("create"), 1);
    let expected = StoredOrg {
        org: org.clone(),
        byok: true,
        version: 1,
        keys: keys.clone(),
    };
    assert_eq!(
        store.load_org(&org).await.expect("load_org"),
        Some(expected.clone()),
        "every field of every key reads back as written, in insertion order"
    );

    // An update keeps the key's place, a new key goes last, BYOK follows the commit.
    let mut updated = keys[1].clone();
    updated.record.state = KeyState::RevokedByProvider { was: Place::Active };
    updated.record.activated_at = None;
    updated.record.revoked_at = Some(Timestamp(1_800_000_000));
    updated.handle = handle(CHECK, 100);
    updated.aws = aws_key("k-renamed", String::new(), false).aws;
    let added = key("k-00", handle(CHECK, 101));
    let mut change = commit(
        &org,
        Some(1),
        vec![added.clone(), updated.clone()],
        Vec::new(),
    );
    change.byok = false;
    assert_eq!(store.commit(change).await.expect("update"), 2);
    let mut keys_now = keys.clone();
    keys_now[1] = updated;
    keys_now.push(added);
    assert_eq!(
        store.load_org(&org).await.expect("load_org"),
        Some(StoredOrg {
            org: org.clone(),
            byok: false,
            version: 2,
            keys: keys_now.clone(),
        })
    );

    // A commit of no keys still takes a version and leaves the keys alone.
    assert_eq!(
        store
            .commit(commit(&org, Some(2), Vec::new(), Vec::new()))
            .await
            .expect("empty commit"),
        3
    );
    let loaded = store.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!((loaded.version, loaded.keys), (3, keys_now));
}

/// A create of an existing org, and a commit naming any version but the
/// current one, fail with `Conflict` and write none of their parts.
pub async fn stale_versions_conflict_and_write_nothing(store: &dyn Store) {
    const CHECK: u32 = 2;
    let org = org_id("conflict");
    store
        .commit(commit(
            &org,
            None,
            vec![key("a", handle(CHECK, 1))],
            vec![event("create")],
        ))
        .await
        .expect("create");
    let open = handle(CHECK, 2);
    let added = handle(CHECK, 3);
    store
        .record_intent(intent(open.clone(), IntentKind::Import, Some(&org), 10))
        .await
        .expect("record_intent");
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;

    // Everything a commit can carry, so that any part written despite the
    // conflict shows.
    let conflicting = |expected| {
        let mut changed = key_in("a", handle(CHECK, 4), KeyState::Active);
        changed.record.activated_at = Some(Timestamp(5));
        Commit {
            byok: false,
            add_intents: vec![intent(added.clone(), IntentKind::Destroy, Some(&org), 11)],
            resolve_intents: vec![open.clone()],
            rotation: Some(RotationChange::Start {
                target: KeyId("a".into()),
                from: Vec::new(),
                at: Timestamp(5),
            }),
            ..commit(
                &org,
                expected,
                vec![changed, key("b", handle(CHECK, 5))],
                vec![event("conflicting")],
            )
        }
    };
    for expected in [None, Some(0), Some(2), Some(u64::MAX)] {
        match store.commit(conflicting(expected)).await {
            Err(StoreError::Conflict(conflicting)) => assert_eq!(conflicting, org),
            other => panic!("commit expecting {expected:?} at version 1: {other:?}"),
        }
        assert_eq!(store.load_org(&org).await.expect("load_org"), before);
        assert_eq!(chain_of(store, &org).await, chain_before);
        assert_eq!(
            open_among(store, &[&open, &added]).await,
            vec![intent(open.clone(), IntentKind::Import, Some(&org), 10)],
            "intents are untouched by a conflicting commit"
        );
        assert_eq!(
            store.latest_rotation(&org).await.expect("latest_rotation"),
            None,
            "no rotation job is started by a conflicting commit"
        );
    }

    assert_eq!(
        store.commit(conflicting(Some(1))).await.expect("current"),
        2
    );
    assert!(
        matches!(
            store.commit(conflicting(Some(1))).await,
            Err(StoreError::Conflict(_))
        ),
        "the version read before another commit is stale"
    );
    assert_eq!(open_among(store, &[&open]).await, Vec::<Intent>::new());
    store.resolve_intent(&added).await.expect("resolve_intent");

    // An org that does not exist has no version to match.
    let never = org_id("conflict-never");
    assert!(matches!(
        store
            .commit(commit(
                &never,
                Some(1),
                vec![key("a", handle(CHECK, 6))],
                vec![event("x")]
            ))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.load_org(&never).await.expect("load_org"), None);
    assert!(chain_of(store, &never).await.is_empty());
}

/// A commit whose last part fails leaves its earlier parts unwritten.
pub async fn a_failed_commit_writes_nothing(store: &dyn Store) {
    const CHECK: u32 = 3;
    let org = org_id("atomic");
    store
        .commit(commit(
            &org,
            None,
            vec![key("a", handle(CHECK, 1))],
            vec![event("create")],
        ))
        .await
        .expect("create");
    let taken = handle(CHECK, 2);
    store
        .record_intent(intent(taken.clone(), IntentKind::Import, None, 1))
        .await
        .expect("record_intent");
    let before = store.load_org(&org).await.expect("load_org");
    let chain_before = chain_of(store, &org).await;

    // The last part of the commit fails (the handle already has an intent).
    let failing = Commit {
        add_intents: vec![intent(taken.clone(), IntentKind::Destroy, Some(&org), 2)],
        rotation: Some(RotationChange::Start {
            target: KeyId("a".into()),
            from: Vec::new(),
            at: Timestamp(2),
        }),
        ..commit(
            &org,
            Some(1),
            vec![key_in("a", handle(CHECK, 1), KeyState::Removed)],
            vec![event("remove")],
        )
    };
    assert!(store.commit(failing).await.is_err());
    assert_eq!(store.load_org(&org).await.expect("load_org"), before);
    assert_eq!(chain_of(store, &org).await, chain_before);
    assert_eq!(
        open_among(store, &[&taken]).await,
        vec![intent(taken.clone(), IntentKind::Import, None, 1)]
    );
    assert_eq!(
        store.latest_rotation(&org).await.expect("latest_rotation"),
        None
    );
    store.resolve_intent(&taken).await.expect("resolve_intent");
}

/// Only orgs with a deactivated or deleted key due by `now` are listed, once.
pub async fn orgs_with_expired_keys_are_found(store: &dyn Store) {
    const CHECK: u32 = 8;
    let now = Timestamp(1_800_000_000);
    let at = |offset: i64| Timestamp(now.0 + offset);
    let deactivated = |offset| KeyState::Deactivated {
        remove_at: at(offset),
    };
    let deleted = |offset| KeyState::Deleted {
        restore_until: at(offset),
    };
    let cases = [
        ("due-deactivated", vec![deactivated(-1)]),
        ("due-deleted-now", vec![deleted(0)]),
        ("not-yet", vec![deactivated(1)]),
        ("revoked", vec![KeyState::Revoked]),
        ("removed", vec![KeyState::Removed, KeyState::Lost]),
        // Its retention pauses while its provider disables it.
        (
            "disabled",
            vec![KeyState::RevokedByProvider {
                was: Place::Deactivated {
                    remove_at: at(-100),
                },
            }],
        ),
        ("due-twice", vec![deactivated(-5), deleted(-6)]),
    ];
    let mut n = 0;
    for (name, keys) in cases {
        let keys = keys
            .into_iter()
            .map(|state| {
                n += 1;
                key_in(&format!("k-{n}"), handle(CHECK, n), state)
            })
            .collect();
        store
            .commit(commit(
                &org_id(&format!("expiry-{name}")),
                None,
                keys,
                Vec::new(),
            ))
            .await
            .expect("create");
    }

    let found = store
        .orgs_with_expired_keys(now)
        .await
        .expect("orgs_with_expired_keys");
    assert!(
        found.windows(2).all(|w| w[0] < w[1]),
        "each org once, in id order: {found:?}"
    );
    let prefix = org_id("expiry-").as_str().to_owned();
    let mine: Vec<OrgId> = found
        .into_iter()
        .filter(|o| o.as_str().starts_with(&prefix))
        .collect();
    assert_eq!(
        mine,
        vec![
            org_id("expiry-due-deactivated"),
            org_id("expiry-due-deleted-now"),
            org_id("expiry-due-twice"),
        ]
    );
}

/// `aws_keys` lists every key with ARNs that is not removed, by org and then
/// in the order added, with the ARNs as stored; an update is seen.
pub async fn aws_keys_not_removed_are_listed_with_their_org(store: &dyn Store) {
    const CHECK: u32 = 25;
    let in_state = |key: StoredKey, state: KeyState| {
        let mut key = key;
        key.record.state = state;
        key
    };
    let b = vec![
        in_state(aws_key("k-2", handle(CHECK, 2), true), KeyState::Active),
        in_state(key("k-1", handle(CHECK, 1)), KeyState::Rotating),
        in_state(aws_key("k-0", handle(CHECK, 3), false), KeyState::Pending),
        in_state(aws_key("k-9", handle(CHECK, 4), true), KeyState::Removed),
    ];
    let a = vec![in_state(
        aws_key("k-5", handle(CHECK, 5), false),
        KeyState::RevokedByProvider { was: Place::Active },
    )];
    let none = vec![key("k-6", handle(CHECK, 6))];
    for (name, keys) in [("aws-b", &b), ("aws-a", &a), ("aws-none", &none)] {
        store
            .commit(commit(&org_id(name), None, keys.clone(), Vec::new()))
            .await
            .expect("create");
    }
    let listed = || async {
        store
            .aws_keys()
            .await
            .expect("aws_keys")
            .into_iter()
            .filter(|k| k.org.as_str().starts_with(org_id("aws-").as_str()))
            .collect::<Vec<_>>()
    };
    let of = |org: &str, key: &StoredKey| OrgAwsKey {
        org: org_id(org),
        key: key.clone(),
    };
    assert_eq!(
        listed().await,
        vec![of("aws-a", &a[0]), of("aws-b", &b[0]), of("aws-b", &b[2])],
        "by org id, then in the order added; removed keys and keys without ARNs left out"
    );

    // Removing one takes it off the list.
    let removed = in_state(b[0].clone(), KeyState::Removed);
    store
        .commit(commit(&org_id("aws-b"), Some(1), vec![removed], Vec::new()))
        .await
        .expect("update");
    assert_eq!(listed().await, vec![of("aws-a", &a[0]), of("aws-b", &b[2])]);
}

/// Of two creates of one org, and of two commits from one version, exactly
/// one wins, and only the winners' events are appended.
pub async fn racing_creates_and_commits_from_one_version_one_wins(a: &dyn Store, b: &dyn Store) {
    const CHECK: u32 = 18;
    let org = org_id("race");
    let create = |racer: u32| {
        commit(
            &org,
            None,
            vec![key("k", handle(CHECK, racer))],
            vec![event(&format!("create by racer {racer}"))],
        )
    };
    let raced = tokio::join!(a.commit(create(0)), b.commit(create(1)));
    assert_eq!(one_winner(&org, [raced.0, raced.1], "create"), 1);

    const ROUNDS: u32 = 20;
    for round in 1..=ROUNDS {
        let version = u64::from(round);
        let change = |racer: u32| {
            commit(
                &org,
                Some(version),
                vec![key_in(
                    "k",
                    handle(CHECK, 2 * round + racer),
                    KeyState::Pending,
                )],
                vec![event(&format!("round {round} racer {racer}"))],
            )
        };
        let raced = tokio::join!(a.commit(change(0)), b.commit(change(1)));
        assert_eq!(
            one_winner(&org, [raced.0, raced.1], &format!("round {round}")),
            version + 1
        );
    }

    let rows = chain_of(a, &org).await;
    assert_eq!(
        rows.len(),
        1 + ROUNDS as usize,
        "only the winners' events were appended"
    );
    assert!(audit::verify(org.as_str(), &rows).is_ok());
    let loaded = b.load_org(&org).await.expect("load_org").expect("org");
    assert_eq!(loaded.version, 1 + u64::from(ROUNDS));
}

/// The one success among `results`, all others being conflicts on `org`.
fn one_winner<T: std::fmt::Debug>(
    org: &OrgId,
    results: impl IntoIterator<Item = Result<T, StoreError>>,
    what: &str,
) -> T {
    let mut won = Vec::new();
    for result in results {
        match result {
            Ok(value) => won.push(value),
            Err(StoreError::Conflict(conflicting)) => assert_eq!(&conflicting, org),
            Err(other) => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "{what}: exactly one wins: {won:?}");
    won.pop().expect("one winner")
}

/// An AWS key serves one org: another org registering the same key ARN is
/// refused, whatever else its commit holds, unless the first org removed it
/// and no longer needs it.
pub async fn an_aws_key_serves_one_org(store: &dyn Store) {
    const CHECK: u32 = 31;
    let (first, second) = (org_id("arn-first"), org_id("arn-second"));
    let shared = aws_key("k-1", handle(CHECK, 1), false);
    let mut mine = commit(&first, None, vec![shared.clone()], Vec::new());
    mine.byok = true;
    assert_eq!(store.commit(mine).await.expect("first org"), 1);

    // The same ARN under another handle, in a commit of the second org.
    let mut theirs = aws_key("k-9", handle(CHECK, 2), false);
    theirs.aws = shared.aws.clone();
    let taken = store
        .commit(commit(
            &second,
            None,
            vec![theirs.clone()],
            vec![event("add")],
        ))
        .await;
    assert!(matches!(taken, Err(StoreError::KeyArnTaken)), "{taken:?}");
    assert_eq!(
        store.load_org(&second).await.expect("load"),
        None,
        "nothing written"
    );
    assert!(chain_of(store, &second).await.is_empty());

    // Removed while still needed, it is still the first org's.
    let mut lost = shared.clone();
    lost.record.state = KeyState::Lost;
    store
        .commit(commit(&first, Some(1), vec![lost.clone()], Vec::new()))
        .await
        .expect("lost");
    assert!(matches!(
        store
            .commit(commit(&second, None, vec![theirs.clone()], Vec::new()))
            .await,
        Err(StoreError::KeyArnTaken)
    ));
    // Removed for good, it is free.
    let mut removed = lost;
    removed.record.state = KeyState::Removed;
    store
        .commit(commit(&first, Some(2), vec![removed], Vec::new()))
        .await
        .expect("removed");
    store
        .commit(commit(&second, None, vec![theirs], Vec::new()))
        .await
        .expect("free once the first org removed it");
}

/// An org's external id for AWS is the first one stored, whatever is offered
/// later; each org has its own; storing it neither enrols the org nor
/// changes its version.
pub async fn aws_external_ids_are_stored_once_per_org(store: &dyn Store) {
    let (a, b) = (org_id("external-id-a"), org_id("external-id-b"));
    let now = Timestamp(1_700_000_000);
    assert_eq!(
        store.aws_external_id(&a, "cmk-first", now).await.unwrap(),
        "cmk-first"
    );
    assert_eq!(
        store.aws_external_id(&a, "cmk-second", now).await.unwrap(),
        "cmk-first",
        "the id never changes"
    );
    assert_eq!(
        store.aws_external_id(&b, "cmk-other", now).await.unwrap(),
        "cmk-other"
    );
    assert!(
        store.load_org(&a).await.unwrap().is_none(),
        "an external id does not enrol the org"
    );
}
