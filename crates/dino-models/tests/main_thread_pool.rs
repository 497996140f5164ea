//! `runtime::main_thread_in_pool` (its own test binary: the global pool is the process's, built once).

use std::collections::HashSet;

use rayon::prelude::*;

/// The calling thread becomes thread 0 of the global pool and works on its own parallel splits; a second call
/// finds the pool built and changes nothing.
#[test]
fn the_calling_thread_is_thread_0_of_the_global_pool() {
    assert_eq!(rayon::current_thread_index(), None);
    assert!(dino_models::runtime::main_thread_in_pool());
    assert_eq!(rayon::current_thread_index(), Some(0));
    let me = std::thread::current().id();
    let ran_on: HashSet<_> = (0..64)
        .into_par_iter()
        .map(|_| std::thread::current().id())
        .collect();
    assert!(
        ran_on.contains(&me),
        "the calling thread took no part in the split"
    );
    let sum: u64 = (0..100_000u64).into_par_iter().sum();
    assert_eq!(sum, 100_000 * 99_999 / 2);
    assert!(!dino_models::runtime::main_thread_in_pool());
}
