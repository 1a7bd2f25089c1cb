//! The live audit event stream: `WatchEvents` sends an org's events from a
//! sequence number on and each new one as it commits, resumable; `cmkctl
//! audit follow` prints them as they come.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use cmk_proto::control::v1 as pb;
use cmk_tests::control_plane::{self, Deployment};

const ORG: &str = "acme";

/// The next event of `stream`, within 10 s.
async fn next(stream: &mut tonic::Streaming<pb::AuditEvent>) -> pb::AuditEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread")]
async fn events_stream_as_they_commit_and_a_watch_resumes_from_a_seq() {
    let d = Deployment::start().await;
    let mut admin = d.client("admin-acme").await;
    control_plane::set_byok(&mut admin, ORG, true).await;
    let mut reader = d.client("reader-acme").await;
    let mut watch = reader
        .watch_events(pb::WatchEventsRequest {
            org_id: ORG.into(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // What was there before the watch, in order from the first...
    let first = next(&mut watch).await;
    assert_eq!(first.seq, 1);
    let mut seen = vec![first];
    while !seen.iter().any(|e| e.action == "watch audit events") {
        seen.push(next(&mut watch).await);
    }
    // ...then what commits while it runs.
    control_plane::set_byok(&mut admin, ORG, false).await;
    while !seen.iter().any(|e| e.action == "byok off") {
        seen.push(next(&mut watch).await);
    }
    for (i, event) in seen.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "in order, none missing: {seen:#?}");
    }
    let actions: Vec<&str> = seen.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "enrol: the generic default key is the master key",
            "byok on",
            "watch audit events",
            "byok off"
        ]
    );

    // Resuming after the third event gives the fourth first.
    let mut resumed = reader
        .watch_events(pb::WatchEventsRequest {
            org_id: ORG.into(),
            after_seq: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut resumed).await, seen[3]);
    assert_eq!(next(&mut resumed).await.action, "watch audit events");

    // Another org's reader may not watch this one.
    let refused = d
        .client("admin-globex")
        .await
        .watch_events(pb::WatchEventsRequest {
            org_id: ORG.into(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // cmkctl audit follow prints each event on a line of its own.
    let mut follow = d
        .hsm
        .pki
        .cmkctl(d.addr(), "reader-acme", ORG)
        .args(["--output", "json", "audit", "follow", "--after", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let printed: Vec<serde_json::Value> = (0..3)
        .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
        .collect();
    follow.kill().unwrap();
    follow.wait().unwrap();
    let seqs: Vec<u64> = printed.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4]);
    assert_eq!(printed[2]["action"], seen[3].action.as_str());
}
