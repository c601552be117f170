//! Memory estimates checked before large allocations, so that a request too big for the machine
//! is one clear error instead of the allocator's abort or the OOM killer.

/// Bytes the system could give this process now (`MemAvailable` of `/proc/meminfo`); `None`
/// where that is unknown (not Linux), in which case no estimate is refused.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `bytes` in GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `Err(message)` when `need` bytes are more than the machine has available; the message says
/// what needed them (`what`), both sizes, and `advice`.
pub fn check(need: u64, what: &str, advice: &str) -> Result<(), String> {
    match available() {
        Some(have) if need > have => Err(format!(
            "{what} needs about {} but {} is available: {advice}",
            gib(need),
            gib(have)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_and_huge_needs_are_refused() {
        if cfg!(target_os = "linux") {
            let have = available().expect("/proc/meminfo has MemAvailable");
            assert!(have > 0);
            let err = check(u64::MAX / 2, "the test", "ask for less").unwrap_err();
            assert!(
                err.contains("the test needs about") && err.ends_with("ask for less"),
                "{err}"
            );
        }
        assert!(check(1, "one byte", "").is_ok());
    }
}
