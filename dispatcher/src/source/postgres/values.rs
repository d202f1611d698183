//! PostgreSQL values, as the database sends them (its binary format), written as JSON.
//!
//! The mapping is the README's contract: integers and floats as JSON numbers (a float that is
//! not finite as the string `"NaN"`, `"Infinity"` or `"-Infinity"`), `numeric` as a string with
//! every digit the database holds, text-like types and enums as strings, `bool` as a boolean,
//! `date` as `YYYY-MM-DD`, `time` as `HH:MM:SS[.ffffff]`, `timestamp` as
//! `YYYY-MM-DDTHH:MM:SS[.ffffff]` and `timestamptz` in UTC with a `Z` (RFC 3339), `uuid` in its
//! usual form, `json`/`jsonb` as the JSON itself, `bytea` as base64, arrays as JSON arrays
//! (nested for several dimensions), NULL as `null`. Any other type is refused before a run
//! starts ([`Mapping::of`]), naming its column.
//!
//! Decoding the binary format here, rather than through a crate per type, keeps every value
//! exact (no float for a numeric, no time zone conversion but to UTC) and the row loop free of
//! intermediate values: each value is written straight into the item's JSON text.

use std::fmt::Write as _;

use base64::Engine as _;
use tokio_postgres::types::{FromSql, Kind, Type};

/// How one column's values are written as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mapping {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    /// Text, varchar, char, name, an enum, or any type whose binary form is its text.
    Text,
    Bytea,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Uuid,
    Json,
    Jsonb,
    Array(Box<Mapping>),
}

impl Mapping {
    /// How a column of type `ty` is written, or `None` when Hopper cannot map it.
    pub(super) fn of(ty: &Type) -> Option<Mapping> {
        match ty.kind() {
            Kind::Enum(_) => return Some(Mapping::Text),
            Kind::Domain(base) => return Mapping::of(base),
            Kind::Array(elem) => return Some(Mapping::Array(Box::new(Mapping::of(elem)?))),
            _ => {}
        }
        Some(match *ty {
            Type::BOOL => Mapping::Bool,
            Type::INT2 => Mapping::Int2,
            Type::INT4 => Mapping::Int4,
            Type::INT8 => Mapping::Int8,
            Type::OID => Mapping::Oid,
            Type::FLOAT4 => Mapping::Float4,
            Type::FLOAT8 => Mapping::Float8,
            Type::NUMERIC => Mapping::Numeric,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Mapping::Text,
            Type::BYTEA => Mapping::Bytea,
            Type::DATE => Mapping::Date,
            Type::TIME => Mapping::Time,
            Type::TIMESTAMP => Mapping::Timestamp,
            Type::TIMESTAMPTZ => Mapping::TimestampTz,
            Type::UUID => Mapping::Uuid,
            Type::JSON => Mapping::Json,
            Type::JSONB => Mapping::Jsonb,
            _ if ty.name() == "citext" => Mapping::Text,
            _ => return None,
        })
    }

    /// True when rows can be paged by a key of this type: its values are totally ordered, and
    /// their JSON goes back to the database as the same value.
    pub(super) fn can_page(&self) -> bool {
        match self {
            Mapping::Int2
            | Mapping::Int4
            | Mapping::Int8
            | Mapping::Oid
            | Mapping::Numeric
            | Mapping::Text
            | Mapping::Date
            | Mapping::Timestamp
            | Mapping::TimestampTz
            | Mapping::Uuid => true,
            // Floats: NaN and -0; bool: two values are no key; the rest have no useful order.
            Mapping::Bool
            | Mapping::Float4
            | Mapping::Float8
            | Mapping::Bytea
            | Mapping::Time
            | Mapping::Json
            | Mapping::Jsonb
            | Mapping::Array(_) => false,
        }
    }

    /// Writes the value `raw` (the database's binary form; `None` for NULL) as JSON into `out`.
    ///
    /// # Errors
    /// A value the database sent in a form this code does not know (a bug or a very new
    /// server), with what was wrong.
    pub(super) fn write(&self, raw: Option<&[u8]>, out: &mut String) -> Result<(), String> {
        let Some(b) = raw else {
            out.push_str("null");
            return Ok(());
        };
        match self {
            Mapping::Bool => out.push_str(if be::<1>(b)?[0] != 0 { "true" } else { "false" }),
            Mapping::Int2 => push_int(out, i16::from_be_bytes(be(b)?)),
            Mapping::Int4 => push_int(out, i32::from_be_bytes(be(b)?)),
            Mapping::Int8 => push_int(out, i64::from_be_bytes(be(b)?)),
            Mapping::Oid => push_int(out, u32::from_be_bytes(be(b)?)),
            Mapping::Float4 => float(out, f64::from(f32::from_be_bytes(be(b)?))),
            Mapping::Float8 => float(out, f64::from_be_bytes(be(b)?)),
            Mapping::Numeric => {
                out.push('"');
                numeric(b, out)?;
                out.push('"');
            }
            Mapping::Text => json_string(out, utf8(b)?),
            Mapping::Bytea => {
                json_string(out, &base64::engine::general_purpose::STANDARD.encode(b));
            }
            Mapping::Date => {
                let days = i32::from_be_bytes(be(b)?);
                let text = match days {
                    i32::MAX => "infinity".to_string(),
                    i32::MIN => "-infinity".to_string(),
                    d => civil(i64::from(d)),
                };
                json_string(out, &text);
            }
            Mapping::Time => {
                let mut text = String::with_capacity(15);
                clock(&mut text, i64::from_be_bytes(be(b)?));
                json_string(out, &text);
            }
            Mapping::Timestamp | Mapping::TimestampTz => {
                let micros = i64::from_be_bytes(be(b)?);
                let text = match micros {
                    i64::MAX => "infinity".to_string(),
                    i64::MIN => "-infinity".to_string(),
                    m => {
                        let mut text = civil(m.div_euclid(86_400_000_000));
                        text.push('T');
                        clock(&mut text, m.rem_euclid(86_400_000_000));
                        if *self == Mapping::TimestampTz {
                            text.push('Z');
                        }
                        text
                    }
                };
                json_string(out, &text);
            }
            Mapping::Uuid => {
                let u: [u8; 16] = be(b)?;
                out.push('"');
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        out.push('-');
                    }
                    let _ = write!(out, "{byte:02x}");
                }
                out.push('"');
            }
            // The database checked it is JSON; written as it is.
            Mapping::Json => out.push_str(utf8(b)?),
            Mapping::Jsonb => match b.split_first() {
                Some((1, text)) => out.push_str(utf8(text)?),
                _ => return Err("jsonb in an unknown binary version".into()),
            },
            Mapping::Array(elem) => array(elem, b, out)?,
        }
        Ok(())
    }
}

/// A column's value as the database sent it, whatever its type: [`Mapping`] decodes it.
pub(super) struct Raw<'a>(pub(super) Option<&'a [u8]>);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw)))
    }

    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

fn be<const N: usize>(b: &[u8]) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| format!("{} bytes where {N} were expected", b.len()))
}

fn utf8(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|e| format!("not UTF-8: {e}"))
}

/// An integer in decimal, without the formatting machinery (a column of them is most of what
/// some rows hold).
fn push_int(out: &mut String, v: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(v));
}

/// A numeric's base-10000 digit as its four decimal digits.
fn push_four(out: &mut String, d: i16) -> Result<(), String> {
    let d = u16::try_from(d)
        .ok()
        .filter(|&d| d < 10_000)
        .ok_or_else(|| format!("numeric with a digit group {d}"))?;
    for div in [1000, 100, 10, 1] {
        out.push(char::from(b'0' + ((d / div) % 10) as u8));
    }
    Ok(())
}

/// `s` as a JSON string, escaped as serde_json escapes it, written in place: the row loop
/// allocates nothing per value. Runs of bytes that need no escape are skipped eight at a time
/// ([`must_escape`]): most text needs none, and this loop was the source's largest single cost.
pub(super) fn json_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !must_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let escape = match bytes[i] {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", bytes[i]);
        } else {
            out.push_str(escape);
        }
        i += 1;
        plain = i;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// True when one of the eight bytes of `w` must be escaped in a JSON string: a control byte
/// (below 0x20), `"` or `\`. Exact, with no false alarm: each test is the classic "has a zero
/// byte" / "has a byte less than n" word trick, which is exact for n up to 128.
fn must_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

fn float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("\"NaN\"");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 {
            "\"Infinity\""
        } else {
            "\"-Infinity\""
        });
    } else {
        // Shortest text that reads back as the same float.
        if let Some(n) = serde_json::Number::from_f64(v) {
            let _ = write!(out, "{n}");
        }
    }
}

/// `YYYY-MM-DD` of a day counted from 2000-01-01 (PostgreSQL's epoch), proleptic Gregorian.
fn civil(days_since_2000: i64) -> String {
    // Howard Hinnant's civil_from_days, from 1970-01-01.
    let z = days_since_2000 + 10_957 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if (0..=9999).contains(&year) {
        format!("{year:04}-{month:02}-{day:02}")
    } else {
        // ISO 8601's expanded years (PostgreSQL writes `BC` instead, which JSON readers do
        // not parse).
        format!("{year:+05}-{month:02}-{day:02}")
    }
}

/// `HH:MM:SS` and, when not whole, `.ffffff`, of microseconds since midnight.
fn clock(out: &mut String, micros: i64) {
    let secs = micros / 1_000_000;
    let frac = micros % 1_000_000;
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        let _ = write!(out, ".{frac:06}");
    }
}

/// Writes the exact decimal text of a `numeric` in its binary form (base-10000 digits, a
/// weight, a sign and a display scale) into `text`.
fn numeric(b: &[u8], text: &mut String) -> Result<(), String> {
    let word = |i: usize| -> Result<i16, String> {
        b.get(i..i + 2)
            .map(|w| i16::from_be_bytes([w[0], w[1]]))
            .ok_or_else(|| "numeric cut short".to_string())
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| "numeric with a negative length")?;
    let weight = i64::from(word(2)?);
    let sign = word(4)? as u16;
    let dscale = usize::try_from(word(6)?).map_err(|_| "numeric with a negative scale")?;
    let special = match sign {
        0xC000 => "NaN",
        0xD000 => "Infinity",
        0xF000 => "-Infinity",
        0x0000 | 0x4000 => "",
        other => return Err(format!("numeric with sign {other:#x}")),
    };
    if !special.is_empty() {
        text.push_str(special);
        return Ok(());
    }
    if b.len() < 8 + 2 * ndigits {
        return Err("numeric cut short".into());
    }
    let digit = |i: i64| -> i16 {
        usize::try_from(i)
            .ok()
            .filter(|&i| i < ndigits)
            .and_then(|i| word(8 + 2 * i).ok())
            .unwrap_or(0)
    };
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                push_int(text, digit(i));
            } else {
                push_four(text, digit(i))?;
            }
        }
    }
    if dscale > 0 {
        text.push('.');
        let start = text.len();
        let mut k = 1;
        while text.len() - start < dscale {
            push_four(text, digit(weight + k))?;
            k += 1;
        }
        text.truncate(start + dscale);
    }
    Ok(())
}

/// A binary array: dimensions, then the elements in row-major order, each with its length
/// (-1 for NULL). Written as nested JSON arrays.
fn array(elem: &Mapping, b: &[u8], out: &mut String) -> Result<(), String> {
    let int = |at: usize| -> Result<i32, String> {
        b.get(at..at + 4)
            .map(|w| i32::from_be_bytes([w[0], w[1], w[2], w[3]]))
            .ok_or_else(|| "array cut short".to_string())
    };
    let ndim = usize::try_from(int(0)?).map_err(|_| "array with negative dimensions")?;
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        dims.push(usize::try_from(int(12 + 8 * d)?).map_err(|_| "array with a negative size")?);
    }
    let mut at = 12 + 8 * ndim;
    if ndim == 0 {
        out.push_str("[]");
        return Ok(());
    }
    fn level(
        elem: &Mapping,
        dims: &[usize],
        b: &[u8],
        at: &mut usize,
        out: &mut String,
    ) -> Result<(), String> {
        out.push('[');
        for i in 0..dims[0] {
            if i > 0 {
                out.push(',');
            }
            if dims.len() > 1 {
                level(elem, &dims[1..], b, at, out)?;
                continue;
            }
            let len = b
                .get(*at..*at + 4)
                .map(|w| i32::from_be_bytes([w[0], w[1], w[2], w[3]]))
                .ok_or_else(|| "array cut short".to_string())?;
            *at += 4;
            match usize::try_from(len) {
                Err(_) => elem.write(None, out)?,
                Ok(n) => {
                    let value = b.get(*at..*at + n).ok_or("array cut short")?;
                    *at += n;
                    elem.write(Some(value), out)?;
                }
            }
        }
        out.push(']');
        Ok(())
    }
    level(elem, &dims, b, &mut at, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_bytes(ndigits: i16, weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight, sign as i16, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    fn numeric(b: &[u8]) -> Result<String, String> {
        let mut text = String::new();
        super::numeric(b, &mut text).map(|()| text)
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in [
            "plain",
            "q\"b\\s",
            "tab\tnl\ncr\r",
            "\u{1}\u{1f}\u{8}\u{c}",
            "é😀",
            "",
            "eight..\"and more text after the quote\\",
            "a longer plain text, with no escape in any of its words",
            "0123456\u{7f}\u{1f}89abcdef\u{80}é\n",
        ] {
            let mut out = String::new();
            json_string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).expect("json"), "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_escaped_as_serde_json_escapes_it(s in "(\\PC|[\\x00-\\x1f\"\\\\]){0,40}") {
            let mut out = String::new();
            json_string(&mut out, &s);
            proptest::prop_assert_eq!(out, serde_json::to_string(&s).expect("json"));
        }

        #[test]
        fn a_word_needs_escaping_exactly_when_one_of_its_bytes_does(w in proptest::prelude::any::<u64>()) {
            let bytewise = w.to_le_bytes().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            proptest::prop_assert_eq!(must_escape(w), bytewise);
        }
    }

    #[test]
    fn numerics_keep_every_digit() {
        // 12345.6789
        assert_eq!(
            numeric(&numeric_bytes(3, 1, 0, 4, &[1, 2345, 6789])).as_deref(),
            Ok("12345.6789")
        );
        // -0.0012 (digits: 12 at weight -1)
        assert_eq!(
            numeric(&numeric_bytes(1, -1, 0x4000, 4, &[12])).as_deref(),
            Ok("-0.0012")
        );
        // 10000 with scale 2: one digit group of weight 1
        assert_eq!(
            numeric(&numeric_bytes(1, 1, 0, 2, &[1])).as_deref(),
            Ok("10000.00")
        );
        assert_eq!(numeric(&numeric_bytes(0, 0, 0, 0, &[])).as_deref(), Ok("0"));
        assert_eq!(
            numeric(&numeric_bytes(0, 0, 0xC000, 0, &[])).as_deref(),
            Ok("NaN")
        );
    }

    #[test]
    fn dates_and_times_are_iso() {
        assert_eq!(civil(0), "2000-01-01");
        assert_eq!(civil(-1), "1999-12-31");
        assert_eq!(civil(59), "2000-02-29");
        assert_eq!(civil(-730_485), "0000-01-01");
        let mut t = String::new();
        clock(&mut t, 3_723_000_042);
        assert_eq!(t, "01:02:03.000042");
    }

    #[test]
    fn floats_that_json_cannot_hold_are_strings() {
        let mut out = String::new();
        float(&mut out, f64::NAN);
        float(&mut out, 0.1);
        assert_eq!(out, "\"NaN\"0.1");
    }
}
