//! Human sizes on the command line: `10GiB`, `512MiB`, `4096`.

/// Parses a size in bytes with an optional binary suffix (B, KiB, MiB, GiB, TiB; K, M, G,
/// T mean the same). Negative numbers parse, so that the server, which owns validation,
/// can refuse them with its own message.
pub fn parse_size(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("{text:?} is not a size like 10GiB, 512MiB or 1048576"))?;
    let mult: i64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}; use B, KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// Formats bytes with the largest binary unit that divides them evenly.
pub fn format_size(bytes: i64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes % (1i64 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("-1GiB"), Ok(-(1 << 30)));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1PB").unwrap_err().contains("unit"));
        assert!(parse_size("99999999999TiB").unwrap_err().contains("too large"));
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size(1000), "1000B");
    }
}
