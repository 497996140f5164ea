//! The `dino` binary.
fn main() {
    println!("dino: the trainer is coming");
}
