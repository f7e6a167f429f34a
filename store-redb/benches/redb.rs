//! redb store benchmarks (heartbeats, GC sweep, register latency) against the memory
//! store: added with the benchmark commit.

fn main() {}
