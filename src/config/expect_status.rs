//! `expect_status` of an http check: comma-separated status codes and
//! `low-high` ranges ("200-399", "200", "200,204,300-302"). The config owns
//! parsing its values; the http check uses the ranges.

use std::ops::RangeInclusive;

/// Status codes hyper accepts: three digits, 100 to 999.
const VALID_STATUS: RangeInclusive<u16> = 100..=999;

/// Parses `expect_status`: comma-separated codes and `low-high` ranges.
/// An error names the part that is wrong.
pub fn parse_status_ranges(text: &str) -> Result<Vec<RangeInclusive<u16>>, String> {
    if text.trim().is_empty() {
        return Err("expect_status is empty; write e.g. \"200-399\" or \"200,204\"".to_string());
    }
    text.split(',')
        .map(|part| parse_range(part.trim()))
        .collect()
}

fn parse_range(part: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = match part.split_once('-') {
        Some((low, high)) => (status(low.trim(), part)?, status(high.trim(), part)?),
        None => {
            let code = status(part, part)?;
            (code, code)
        }
    };
    if low > high {
        return Err(format!(
            "`{part}`: the range runs backwards ({low} > {high})"
        ));
    }
    Ok(low..=high)
}

fn status(text: &str, part: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(code) if VALID_STATUS.contains(&code) && text.len() == 3 => Ok(code),
        _ => Err(format!(
            "`{part}` is not a status code (100-999) or a range like 200-399"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_single_codes_and_lists() {
        assert_eq!(parse_status_ranges("200-399"), Ok(vec![200..=399]));
        assert_eq!(parse_status_ranges("200"), Ok(vec![200..=200]));
        assert_eq!(
            parse_status_ranges("200,204,300-302"),
            Ok(vec![200..=200, 204..=204, 300..=302])
        );
        assert_eq!(
            parse_status_ranges(" 200 , 300 - 302 "),
            Ok(vec![200..=200, 300..=302])
        );
    }

    #[test]
    fn bad_parts_are_named() {
        for (text, named) in [
            ("", "empty"),
            ("  ", "empty"),
            ("200,abc", "`abc`"),
            ("200,", "``"),
            ("99", "`99`"),
            ("1000", "`1000`"),
            ("+200", "`+200`"),
            ("0200", "`0200`"),
            ("200-", "`200-`"),
            ("200-300-400", "`200-300-400`"),
            ("399-200", "`399-200`"),
        ] {
            let e = parse_status_ranges(text).unwrap_err();
            assert!(e.contains(named), "{text:?} gave {e:?}");
        }
    }

    proptest! {
        #[test]
        fn any_text_never_panics(text in "\\PC{0,40}") {
            let _ = parse_status_ranges(&text);
        }

        #[test]
        fn written_ranges_round_trip(
            ranges in proptest::collection::vec((100u16..=999, 0u16..=50), 1..6)
        ) {
            let ranges: Vec<RangeInclusive<u16>> = ranges
                .into_iter()
                .map(|(low, width)| low..=(low + width).min(999))
                .collect();
            let text = ranges
                .iter()
                .map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) })
                .collect::<Vec<_>>()
                .join(",");
            prop_assert_eq!(parse_status_ranges(&text), Ok(ranges));
        }
    }
}
