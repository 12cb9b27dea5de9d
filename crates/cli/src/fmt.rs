//! Numbers for people.

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count in B, KiB, MiB, GiB or TiB.
pub(crate) fn bytes(n: u64) -> String {
    kappa_server::api::format_bytes(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1_020_000), "1,020,000");
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(155_000_000), "147.8 MiB");
    }
}
