//! A chunk's items as the array parameters of the batched statement, built column by column in
//! one walk of each item's JSON.
//!
//! Each bound field goes from the item's text straight into its column: a string without
//! escapes is copied once, from where it lies, with no `serde_json::Value`, no parameter list
//! per item and no second copy into an array literal (binding and building the arrays were 40%
//! of a consumer's CPU in a table copy). A column of a type with a plain binary form (`int2`,
//! `int4`, `int8`, `text`, `varchar`, `bpchar`, `numeric`) goes as a binary array, which the
//! database reads element by element instead of parsing a literal and then each element's text
//! (its array input was a fifth of its CPU in the same copy); any other column goes as a text
//! array literal.
//!
//! Invariants:
//! - The database gets the values it would get from the items one by one. A binary element is
//!   written only where it is exactly what the type's input function makes of the value's text:
//!   an integer in the type's range, a decimal written plainly (`-?digits[.digits]`), a text.
//!   Any other value in a binary column (a string for an `int8`, `1e3` for a `numeric`) turns
//!   the whole column into a text literal for this chunk, so the database parses it, or refuses
//!   it, as before.
//! - An item is bad for the same reasons and with the same message as when bound alone (the
//!   first of its fields, in the statement's order, that is missing or cannot be bound), and
//!   nothing of it stays in any column.

use std::borrow::Cow;
use std::error::Error as StdError;

use bytes::BytesMut;
use hopper_common::postgres::{into_text, string_as_is};
use hopper_common::Item;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};

use super::fields::{self, Fields, Scalar};

/// One array parameter, in the text or the binary format.
#[derive(Debug)]
pub(super) struct Array {
    bytes: Vec<u8>,
    binary: bool,
}

impl ToSql for Array {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        if self.binary {
            Format::Binary
        } else {
            Format::Text
        }
    }

    to_sql_checked!();
}

/// A chunk's items as arrays: one per statement parameter, each with an element per good item.
#[derive(Debug)]
pub(super) struct Columns<'i> {
    pub(super) arrays: Vec<Array>,
    /// Good items: the arrays' length.
    pub(super) rows: usize,
    /// The bad items, in order, with why.
    pub(super) bad: Vec<(&'i Item, String)>,
}

/// The arrays for `items`, binding the fields `names` to parameters of `types`.
pub(super) fn build<'i>(items: &'i [Item], names: &[String], types: &[Type]) -> Columns<'i> {
    let mut forms: Vec<Form> = types.iter().map(Form::of).collect();
    loop {
        match attempt(items, names, types, &forms) {
            Ok(columns) => return columns,
            // Each round turns one more column into a literal, which takes any value.
            Err(NotBinary(j)) => forms[j] = Form::Literal,
        }
    }
}

/// How a column's elements are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Int2,
    Int4,
    Int8,
    /// A text-like type, whose binary form is its text.
    Text,
    Numeric,
    /// A text array literal: `{"a","b",NULL}`.
    Literal,
}

impl Form {
    fn of(ty: &Type) -> Form {
        match *ty {
            Type::INT2 => Form::Int2,
            Type::INT4 => Form::Int4,
            Type::INT8 => Form::Int8,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR => Form::Text,
            Type::NUMERIC => Form::Numeric,
            _ => Form::Literal,
        }
    }
}

/// Column `.0` holds a value that has no binary element: it must be a literal.
struct NotBinary(usize);

/// Why a value did not go into its column.
enum Refusal {
    /// The item is bad: why, as binding it alone says.
    Bad(String),
    NotBinary,
}

/// The binary array header: dimensions, a has-nulls flag, the element type, the length and the
/// lower bound; the flag and the length are written at the end.
const HEADER: usize = 20;

struct Column {
    form: Form,
    bytes: Vec<u8>,
    nulls: bool,
}

impl Column {
    fn new(form: Form, ty: &Type, items: usize) -> Column {
        let mut bytes = Vec::with_capacity(items * 16 + HEADER);
        if form == Form::Literal {
            bytes.push(b'{');
        } else {
            bytes.extend_from_slice(&1i32.to_be_bytes());
            bytes.extend_from_slice(&0i32.to_be_bytes());
            bytes.extend_from_slice(&ty.oid().to_be_bytes());
            bytes.extend_from_slice(&0i32.to_be_bytes());
            bytes.extend_from_slice(&1i32.to_be_bytes());
        }
        Column {
            form,
            bytes,
            nulls: false,
        }
    }

    /// Appends `value` as the column's element after `rows` others.
    fn push(&mut self, value: Scalar<'_>, ty: &Type, rows: usize) -> Result<(), Refusal> {
        let out = &mut self.bytes;
        match self.form {
            Form::Literal => {
                if rows > 0 {
                    out.push(b',');
                }
                match text(value, ty)? {
                    None => out.extend_from_slice(b"NULL"),
                    Some(text) => quote(out, &text),
                }
            }
            Form::Text => match text(value, ty)? {
                None => self.null(),
                Some(text) => {
                    let len = i32::try_from(text.len()).map_err(|_| Refusal::NotBinary)?;
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            },
            Form::Int2 | Form::Int4 | Form::Int8 => match value {
                Scalar::Null => self.null(),
                Scalar::Number(n) => {
                    let n = n.as_i64().ok_or(Refusal::NotBinary)?;
                    match self.form {
                        Form::Int2 => {
                            let n = i16::try_from(n).map_err(|_| Refusal::NotBinary)?;
                            out.extend_from_slice(&2i32.to_be_bytes());
                            out.extend_from_slice(&n.to_be_bytes());
                        }
                        Form::Int4 => {
                            let n = i32::try_from(n).map_err(|_| Refusal::NotBinary)?;
                            out.extend_from_slice(&4i32.to_be_bytes());
                            out.extend_from_slice(&n.to_be_bytes());
                        }
                        _ => {
                            out.extend_from_slice(&8i32.to_be_bytes());
                            out.extend_from_slice(&n.to_be_bytes());
                        }
                    }
                }
                _ => return Err(Refusal::NotBinary),
            },
            Form::Numeric => match value {
                Scalar::Null => self.null(),
                // The text a number binds as, as `into_text` writes it.
                Scalar::Number(n) => {
                    if !numeric(&n.to_string(), out) {
                        return Err(Refusal::NotBinary);
                    }
                }
                Scalar::Str(s) => {
                    if !numeric(&s, out) {
                        return Err(Refusal::NotBinary);
                    }
                }
                _ => return Err(Refusal::NotBinary),
            },
        }
        Ok(())
    }

    fn null(&mut self) {
        self.bytes.extend_from_slice(&(-1i32).to_be_bytes());
        self.nulls = true;
    }

    /// The array of `rows` elements.
    fn finish(mut self, rows: usize) -> Array {
        if self.form == Form::Literal {
            self.bytes.push(b'}');
        } else {
            self.bytes[4..8].copy_from_slice(&i32::from(self.nulls).to_be_bytes());
            // A chunk's items are far fewer than i32::MAX.
            let rows = i32::try_from(rows).unwrap_or(i32::MAX);
            self.bytes[12..16].copy_from_slice(&rows.to_be_bytes());
        }
        Array {
            bytes: self.bytes,
            binary: self.form != Form::Literal,
        }
    }
}

/// One pass over the items with each column in its form, or the first column that cannot be.
fn attempt<'i>(
    items: &'i [Item],
    names: &[String],
    types: &[Type],
    forms: &[Form],
) -> Result<Columns<'i>, NotBinary> {
    let mut columns: Vec<Column> = forms
        .iter()
        .zip(types)
        .map(|(&form, ty)| Column::new(form, ty, items.len()))
        .collect();
    let mut marks = vec![0usize; columns.len()];
    let (mut rows, mut bad) = (0, Vec::new());
    for item in items {
        let fields = match fields::read::<Scalar>(&item.data, names) {
            Ok(Fields::Object(fields)) => fields,
            Ok(Fields::NotObject) => {
                bad.push((item, super::NOT_OBJECT.to_string()));
                continue;
            }
            Err(e) => {
                bad.push((item, format!("not valid JSON: {e}")));
                continue;
            }
        };
        for (mark, column) in marks.iter_mut().zip(&columns) {
            *mark = column.bytes.len();
        }
        let mut why = None;
        for (j, ((name, ty), value)) in names.iter().zip(types).zip(fields).enumerate() {
            let Some(value) = value else {
                why = Some(super::missing(name));
                break;
            };
            match columns[j].push(value, ty, rows) {
                Ok(()) => {}
                Err(Refusal::Bad(reason)) => {
                    why = Some(super::unbound(name, ty, &reason));
                    break;
                }
                Err(Refusal::NotBinary) => return Err(NotBinary(j)),
            }
        }
        match why {
            None => rows += 1,
            Some(why) => {
                for (column, &mark) in columns.iter_mut().zip(&marks) {
                    column.bytes.truncate(mark);
                }
                bad.push((item, why));
            }
        }
    }
    Ok(Columns {
        arrays: columns.into_iter().map(|c| c.finish(rows)).collect(),
        rows,
        bad,
    })
}

/// The value's text for a parameter of type `ty`, as [`into_text`] makes it (`None` is NULL),
/// borrowed from the item where it is a string taken as it is.
fn text<'a>(value: Scalar<'a>, ty: &Type) -> Result<Option<Cow<'a, str>>, Refusal> {
    match value {
        Scalar::Str(s) if string_as_is(ty) => Ok(Some(s)),
        other => into_text(other.into_value(), ty)
            .map(|t| t.map(Cow::Owned))
            .map_err(Refusal::Bad),
    }
}

/// `text` as a quoted element of an array literal.
fn quote(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    // Most values hold neither a quote nor a backslash: copied whole.
    let mut rest = text;
    while let Some(at) = rest.find(['"', '\\']) {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        out.push(b'\\');
        out.push(rest.as_bytes()[at]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest.as_bytes());
    out.push(b'"');
}

/// Most digits a binary `numeric` element is written for; a longer one goes as text.
const NUMERIC_DIGITS: usize = 1000;

/// Writes the plain decimal `s` (`-?digits[.digits]`) as a binary `numeric` element: base-10000
/// digits aligned on the decimal point, the weight of the first, the sign, and as many decimal
/// places as `s` has, as the type's input function reads it (the database strips zero digits
/// and applies the scale). False, with nothing written, for any other text.
fn numeric(s: &str, out: &mut Vec<u8>) -> bool {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((int, frac)) if !frac.is_empty() => (int, frac),
        Some(_) => return false,
        None => (body, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || int.len() + frac.len() > NUMERIC_DIGITS {
        return false;
    }
    let int = int.trim_start_matches('0');
    let (int_groups, frac_groups) = (int.len().div_ceil(4), frac.len().div_ceil(4));
    let groups = int_groups + frac_groups;
    // At most 1000 digits: every count below fits its field.
    let len = (8 + 2 * groups) as i32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&(groups as u16).to_be_bytes());
    out.extend_from_slice(&(int_groups as i16 - 1).to_be_bytes());
    out.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&(frac.len() as u16).to_be_bytes());
    let group = |t: &[u8]| t.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    // The integer part's first group holds what is left over from groups of four.
    let lead = match int.len() % 4 {
        0 => 4.min(int.len()),
        n => n,
    };
    let (first, rest) = int.as_bytes().split_at(lead);
    if !first.is_empty() {
        out.extend_from_slice(&group(first).to_be_bytes());
    }
    for g in rest.chunks(4) {
        out.extend_from_slice(&group(g).to_be_bytes());
    }
    for g in frac.as_bytes().chunks(4) {
        // A last group of fewer than four digits stands for its digits followed by zeros.
        let n = group(g) * 10u16.pow(4 - g.len() as u32);
        out.extend_from_slice(&n.to_be_bytes());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The element `numeric` writes for `s`, without its length: (ndigits, weight, sign,
    /// dscale, digits).
    fn numeric_of(s: &str) -> Option<(u16, i16, u16, u16, Vec<u16>)> {
        let mut out = Vec::new();
        if !numeric(s, &mut out) {
            assert!(out.is_empty(), "{s}: nothing written when refused");
            return None;
        }
        let word = |at: usize| u16::from_be_bytes([out[at], out[at + 1]]);
        let len = i32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert_eq!(
            len + 4,
            out.len(),
            "{s}: the length says the element's size"
        );
        let n = word(4);
        let digits = (0..n as usize).map(|i| word(12 + 2 * i)).collect();
        Some((n, word(6) as i16, word(8), word(10), digits))
    }

    #[test]
    fn plain_decimals_become_base_10000_digits_aligned_on_the_point() {
        assert_eq!(numeric_of("1.99"), Some((2, 0, 0, 2, vec![1, 9900])));
        assert_eq!(numeric_of("1.990"), Some((2, 0, 0, 3, vec![1, 9900])));
        assert_eq!(
            numeric_of("00012345.6"),
            Some((3, 1, 0, 1, vec![1, 2345, 6000]))
        );
        assert_eq!(numeric_of("12345678"), Some((2, 1, 0, 0, vec![1234, 5678])));
        assert_eq!(numeric_of("0.5"), Some((1, -1, 0, 1, vec![5000])));
        assert_eq!(
            numeric_of("-0.00012"),
            Some((2, -1, 0x4000, 5, vec![1, 2000]))
        );
        assert_eq!(numeric_of("0"), Some((0, -1, 0, 0, vec![])));
        assert_eq!(numeric_of("-0.00"), Some((1, -1, 0x4000, 2, vec![0])));
        assert_eq!(numeric_of("10000"), Some((2, 1, 0, 0, vec![1, 0])));
    }

    #[test]
    fn anything_but_a_plain_decimal_is_left_to_the_database() {
        let long = "9".repeat(NUMERIC_DIGITS + 1);
        for s in [
            "", "-", ".5", "5.", "+1", " 1", "1 ", "1e3", "NaN", "Infinity", "1.2.3", "--1", "0x1",
            "١", &long,
        ] {
            assert_eq!(numeric_of(s), None, "{s:?}");
        }
        assert!(numeric_of(&"9".repeat(NUMERIC_DIGITS)).is_some());
    }

    fn items(lines: &[&str]) -> Vec<Item> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| Item {
                line: i as u64 + 1,
                data: l.to_string(),
            })
            .collect()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn columns_of_plain_values_go_binary_and_the_rest_as_literals() {
        let items = items(&[
            r#"{"i": 7, "t": "a \"b\" \\c, {d}", "n": "1.5", "j": {"k": 1}}"#,
            r#"{"i": null, "t": null, "n": null, "j": null}"#,
        ]);
        let types = [Type::INT8, Type::TEXT, Type::NUMERIC, Type::JSONB];
        let c = build(&items, &names(&["i", "t", "n", "j"]), &types);
        assert_eq!((c.rows, c.bad.len()), (2, 0));
        let binary: Vec<bool> = c.arrays.iter().map(|a| a.binary).collect();
        assert_eq!(binary, [true, true, true, false]);
        let i = &c.arrays[0].bytes;
        // One dimension, nulls, int8 elements, two of them from 1.
        assert_eq!(&i[..4], &1i32.to_be_bytes());
        assert_eq!(&i[4..8], &1i32.to_be_bytes());
        assert_eq!(&i[8..12], &Type::INT8.oid().to_be_bytes());
        assert_eq!(&i[12..16], &2i32.to_be_bytes());
        assert_eq!(&i[16..20], &1i32.to_be_bytes());
        assert_eq!(&i[20..24], &8i32.to_be_bytes());
        assert_eq!(&i[24..32], &7i64.to_be_bytes());
        assert_eq!(&i[32..], &(-1i32).to_be_bytes());
        let t = &c.arrays[1].bytes;
        assert_eq!(&t[24..], b"a \"b\" \\c, {d}\xff\xff\xff\xff");
        assert_eq!(
            String::from_utf8_lossy(&c.arrays[3].bytes),
            r#"{"{\"k\":1}",NULL}"#
        );
    }

    #[test]
    fn a_value_without_a_binary_form_makes_its_column_a_literal() {
        let items = items(&[
            r#"{"i": 1, "n": "2.5"}"#,
            r#"{"i": "3", "n": "1e3"}"#,
            r#"{"i": 40000, "n": 7}"#,
        ]);
        let c = build(&items, &names(&["i", "n"]), &[Type::INT2, Type::NUMERIC]);
        assert_eq!((c.rows, c.bad.len()), (3, 0));
        assert!(!c.arrays[0].binary && !c.arrays[1].binary);
        assert_eq!(
            String::from_utf8_lossy(&c.arrays[0].bytes),
            r#"{"1","3","40000"}"#
        );
        assert_eq!(
            String::from_utf8_lossy(&c.arrays[1].bytes),
            r#"{"2.5","1e3","7"}"#
        );
    }

    #[test]
    fn a_bad_item_leaves_nothing_in_any_column_and_says_why_as_alone() {
        let items = items(&[
            r#"{"i": 1, "t": "x", "b": "AAE="}"#,
            r#"{"i": 2, "t": {"no": 1}, "b": "AAE="}"#,
            r#"{"i": 3, "b": "AAE="}"#,
            r#"{"i": 4, "t": "y", "b": "not base64!"}"#,
            r#"[1]"#,
            r#"{"i": 5"#,
            r#"{"i": 6, "t": "z", "b": null}"#,
        ]);
        let types = [Type::INT4, Type::TEXT, Type::BYTEA];
        let c = build(&items, &names(&["i", "t", "b"]), &types);
        assert_eq!(c.rows, 2);
        let bad: Vec<(u64, &str)> = c.bad.iter().map(|(i, w)| (i.line, w.as_str())).collect();
        assert_eq!(
            bad[0],
            (2, "field `t` (text): a JSON object cannot be bound to it")
        );
        assert_eq!(bad[1], (3, "field `t` is missing (processor.params)"));
        assert!(
            bad[2].1.starts_with("field `b` (bytea): not base64"),
            "{}",
            bad[2].1
        );
        assert_eq!(bad[3], (5, super::super::NOT_OBJECT));
        assert!(bad[4].1.starts_with("not valid JSON: "), "{}", bad[4].1);
        let i = &c.arrays[0].bytes;
        assert_eq!(&i[12..16], &2i32.to_be_bytes());
        assert_eq!(
            &i[HEADER..],
            [
                &4i32.to_be_bytes()[..],
                &1i32.to_be_bytes(),
                &4i32.to_be_bytes(),
                &6i32.to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(
            String::from_utf8_lossy(&c.arrays[2].bytes),
            r#"{"\\x0001",NULL}"#
        );
    }
}
