// `sqlx::migrate!` embeds the migrations at compile time: rebuild when one is added or changed
// (as sqlx's documentation recommends), or a local build keeps running the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
