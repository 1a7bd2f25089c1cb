//! `sqlx::migrate!` embeds the migrations when the crate compiles; without
//! this, adding a migration file would not trigger a rebuild.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
