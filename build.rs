//! sqlx embeds `migrations/` at compile time but does not notice a new file
//! there by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
