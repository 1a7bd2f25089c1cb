//! For tests against the AWS KMS and STS emulator (moto server): where it is,
//! and the setup calls — creating, disabling, deleting keys — that the code
//! under test deliberately does not have.
//!
//! Start it with `scripts/moto.sh start`; tests reach it at
//! `CMK_TEST_AWS_ENDPOINT` (default http://127.0.0.1:4566) and fail, never
//! skip, when it does not answer.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use crate::{AwsCredentials, AwsSettings, KeyArn, RoleArn};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use cmk_secret::SecretBytes;

/// The account moto gives the plain test credentials.
pub const ACCOUNT: &str = "123456789012";

pub fn endpoint() -> String {
    std::env::var("CMK_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// The emulator's endpoint; panics with how to start it when it does not answer.
pub async fn emulator() -> String {
    let endpoint = endpoint();
    let address = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let connected = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(&address),
    )
    .await;
    if !matches!(connected, Ok(Ok(_))) {
        panic!(
            "the AWS KMS emulator does not answer at {endpoint}: start it with \
             `scripts/moto.sh start` (installs moto[server] from PyPI on first use), or point \
             CMK_TEST_AWS_ENDPOINT at a running one"
        );
    }
    endpoint
}

pub fn credentials() -> AwsCredentials {
    AwsCredentials::Static {
        access_key_id: "testing".into(),
        secret_access_key: SecretBytes::copy_from(b"testing"),
    }
}

/// A plain SDK client for the test's own setup: creating, disabling, deleting
/// keys — calls the client under test deliberately does not have.
pub fn admin(endpoint: &str, region: &str, credentials: Credentials) -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .endpoint_url(endpoint)
            .credentials_provider(credentials)
            .build(),
    )
}

pub fn test_credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "test")
}

pub async fn create_key(admin: &aws_sdk_kms::Client) -> KeyArn {
    let created = admin
        .create_key()
        .key_usage(KeyUsageType::EncryptDecrypt)
        .key_spec(KeySpec::SymmetricDefault)
        .description("cmk aws_kms test")
        .send()
        .await
        .expect("CreateKey");
    KeyArn::parse(created.key_metadata().unwrap().arn().unwrap()).expect("moto's ARN parses")
}

pub async fn new_key(endpoint: &str, region: &str) -> KeyArn {
    create_key(&admin(endpoint, region, test_credentials())).await
}

/// Settings of the code under test: every region on the emulator except those
/// given, which get their own endpoint.
pub fn settings(endpoint: &str, regions: &[(&str, &str)]) -> AwsSettings {
    AwsSettings {
        endpoint: Some(endpoint.into()),
        endpoint_for_region: regions
            .iter()
            .map(|(region, url)| ((*region).to_owned(), (*url).to_owned()))
            .collect(),
        credentials: credentials(),
        ..Default::default()
    }
}

/// Credentials of `role`, assumed with the test identity. moto gives them the
/// role's account: keys made with them are out of the test identity's reach.
pub async fn role_credentials(endpoint: &str, role: &RoleArn) -> Credentials {
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(test_credentials())
            .build(),
    );
    let assumed = sts
        .assume_role()
        .role_arn(role.as_str())
        .role_session_name("cmk-test-setup")
        .send()
        .await
        .expect("AssumeRole");
    let session = assumed.credentials().expect("credentials");
    Credentials::new(
        session.access_key_id(),
        session.secret_access_key(),
        Some(session.session_token().to_owned()),
        None,
        "test",
    )
}

/// Disables (`false`) or enables (`true`) the key, as its owner would.
pub async fn set_enabled(endpoint: &str, key: &KeyArn, enabled: bool) {
    let admin = admin(endpoint, key.region(), test_credentials());
    // moto's DisableKey and EnableKey take the key id, not the ARN.
    if enabled {
        admin
            .enable_key()
            .key_id(key.key_id())
            .send()
            .await
            .expect("EnableKey");
    } else {
        admin
            .disable_key()
            .key_id(key.key_id())
            .send()
            .await
            .expect("DisableKey");
    }
}

/// Every byte sent to the emulator through a [`recording_proxy`].
#[derive(Clone, Default)]
pub struct Recorded(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Recorded {
    /// What was sent so far, as text (requests are HTTP/1.1 in the clear).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A TCP proxy in front of the emulator that keeps a copy of every request:
/// for checking what the code under test sends where the emulator accepts
/// anything (moto does not evaluate a role's trust policy or a key policy).
/// Returns the proxy's endpoint and the recording.
pub async fn recording_proxy(endpoint: &str) -> (String, Recorded) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let recorded = Recorded::default();
    let kept = recorded.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, kept) = (upstream.clone(), kept.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let requests = async {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        kept.0.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = server_write.shutdown().await;
                };
                let answers = async {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(requests, answers);
            });
        }
    });
    (format!("http://{address}"), recorded)
}
