// The migrations are embedded at compile time (`sqlx::migrate!`), which does not tell
// cargo to look at their folder: without this a new migration file would not be built in.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
