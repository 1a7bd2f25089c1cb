//! A PostgreSQL database of a test's own, on the server the tests use.
//!
//! The server is the one at `CMK_TEST_POSTGRES_URL` (by default
//! `postgres://postgres@127.0.0.1:5432/test`), connected to as a role that
//! may create databases. Each [`TestDb`] is created from `template0` with an
//! ICU en-US collation, in which text does not sort in byte order, and is
//! dropped when the value is. Without a server, creating one fails and says
//! how to start one: tests that need PostgreSQL are never skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    hash::{BuildHasher, RandomState},
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
};

use sqlx::{ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};

use crate::{PgStore, PgStoreOptions};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database of the test's own, dropped when this is.
pub struct TestDb {
    name: String,
    server: PgConnectOptions,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn create() -> Self {
        let server = server();
        let name = unique_name();
        let mut admin = connect(&server).await;
        // Identifiers cannot be bound; `unique_name` makes a plain one.
        sqlx::raw_sql(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 \
             LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
        ))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("creating the test database {name}: {e}"));
        Self { name, server }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How to connect to it.
    pub fn options(&self) -> PgConnectOptions {
        self.server.clone().database(&self.name)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.options().to_url_lossy().to_string()
    }

    /// A store with a small pool: many tests run at once on one server.
    pub async fn open(&self) -> PgStore {
        let options = PgStoreOptions {
            max_connections: 4,
            ..PgStoreOptions::default()
        };
        PgStore::open_with(&self.url(), options)
            .await
            .expect("open store")
    }

    /// A connection that bypasses the store, as an operator's shell would.
    pub async fn raw(&self) -> PgConnection {
        connect(&self.options()).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the current
        // thread's: the database is dropped from a thread of its own.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(async {
                    let mut admin = PgConnection::connect_with(&server).await?;
                    // FORCE ends the store's connections that are still closing.
                    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await
                        .map(drop)
                })
                .map_err(std::io::Error::other)
        })
        .join();
        // Only a stray database is left behind: not worth failing a test (or
        // aborting one that is already panicking) for.
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "could not drop the test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

fn server() -> PgConnectOptions {
    let url = std::env::var("CMK_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("CMK_TEST_POSTGRES_URL is not a PostgreSQL URL: {e}"))
}

async fn connect(options: &PgConnectOptions) -> PgConnection {
    PgConnection::connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {}:{} as {} (database {}): {e}\n\
             These tests need a running server. Start the local one with\n    \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             or point CMK_TEST_POSTGRES_URL (default {DEFAULT_URL}) at a server where \
             this role may create databases.",
                options.get_host(),
                options.get_port(),
                options.get_username(),
                options.get_database().unwrap_or("-"),
            )
        })
}

/// A database name no other test, run or process uses.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new().hash_one((std::process::id(), n));
    format!("cmk_test_{random:016x}")
}
