//! What every part of Hopper that talks to PostgreSQL shares: values sent in the text format
//! (converted by the database to the parameter's type), the database's errors as a person reads
//! them, where a connection goes, without its password, and how it is made ([`link`]: the URL
//! read as libpq reads it, `sslmode` and the certificate settings with rustls).
//!
//! Values go in PostgreSQL's text format and the database converts them to the types the
//! statement declares (numeric exactly, dates, uuid, arrays...): a JSON string as is, a number
//! as written, a boolean as `true`/`false`, `null` as NULL; an array for an array parameter as
//! an array literal; any value for a `json`/`jsonb` parameter as its JSON text; a string for a
//! `bytea` parameter as base64 (as the PostgreSQL source writes it).

pub mod link;

pub use link::{PgLink, TlsMode};

use std::error::Error as StdError;

use base64::Engine as _;
use bytes::BytesMut;
use serde_json::Value;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, Kind, ToSql, Type};
use tokio_postgres::Config;

/// The database's message with its SQLSTATE and detail, for a reason.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Host and port (or socket) of a connection config, for messages: never the password.
pub fn describe_place(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// A parameter in PostgreSQL's text format: the database parses it as the parameter's type.
#[derive(Debug)]
pub struct Text(pub Option<String>);

impl ToSql for Text {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// The text form of `value` for a parameter of type `ty`; `None` is NULL.
pub fn text_for(value: &Value, ty: &Type) -> Result<Option<String>, String> {
    let json = is_json(ty);
    let array = matches!(ty.kind(), Kind::Array(_));
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::String(s) if string_as_is(ty) => s.clone(),
        _ if json => value.to_string(),
        // The one string left: a `bytea`'s base64.
        Value::String(b64) => bytea_hex(b64)?,
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) if array => array_literal(items),
        Value::Array(_) | Value::Object(_) => {
            return Err(format!("a JSON {} cannot be bound to it", kind_of(value)))
        }
    }))
}

/// [`text_for`], taking the value: a string goes as it is, not copied.
///
/// # Errors
/// As [`text_for`].
pub fn into_text(value: Value, ty: &Type) -> Result<Option<String>, String> {
    match value {
        Value::String(s) if string_as_is(ty) => Ok(Some(s)),
        other => text_for(&other, ty),
    }
}

fn is_json(ty: &Type) -> bool {
    *ty == Type::JSON || *ty == Type::JSONB
}

/// Whether a JSON string is the parameter's text as it is: not for `json`/`jsonb` (it is
/// quoted, as JSON) nor `bytea` (base64 decoded). [`into_text`] moves such a string; a caller
/// that holds it borrowed can use it as it is, without a `Value`.
pub fn string_as_is(ty: &Type) -> bool {
    !is_json(ty) && *ty != Type::BYTEA
}

/// A `bytea` parameter from base64 (as the PostgreSQL source writes it), in the hex text form.
fn bytea_hex(b64: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("not base64: {e}"))?;
    let mut hex = String::with_capacity(2 + bytes.len() * 2);
    hex.push_str("\\x");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    Ok(hex)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A PostgreSQL array literal: `{1,"a b",NULL,{2,3}}`.
fn array_literal(items: &[Value]) -> String {
    let mut out = String::from("{");
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => out.push_str(&array_literal(inner)),
            Value::String(s) => quote_element(&mut out, s),
            Value::Object(_) => quote_element(&mut out, &v.to_string()),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
    out.push('}');
    out
}

fn quote_element(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn into_text_is_text_for() {
        for (v, ty) in [
            (json!("a\"b"), Type::TEXT),
            (json!("a"), Type::JSONB),
            (json!("AAE="), Type::BYTEA),
            (json!(null), Type::TEXT),
            (json!(1.5), Type::NUMERIC),
            (json!([1, "x"]), Type::TEXT_ARRAY),
            (json!({"a": 1}), Type::INT4),
        ] {
            assert_eq!(into_text(v.clone(), &ty), text_for(&v, &ty), "{v} as {ty}");
        }
    }

    #[test]
    fn values_take_the_text_form_their_parameter_type_reads() {
        let t = |v: Value, ty: Type| text_for(&v, &ty);
        assert_eq!(t(json!(null), Type::INT4), Ok(None));
        assert_eq!(t(json!(42), Type::INT4), Ok(Some("42".into())));
        assert_eq!(t(json!("12.50"), Type::NUMERIC), Ok(Some("12.50".into())));
        assert_eq!(t(json!(true), Type::BOOL), Ok(Some("true".into())));
        assert_eq!(t(json!("x"), Type::JSONB), Ok(Some("\"x\"".into())));
        assert_eq!(t(json!({"a": 1}), Type::JSON), Ok(Some("{\"a\":1}".into())));
        assert_eq!(
            t(json!("AAEC/w=="), Type::BYTEA),
            Ok(Some("\\x000102ff".into()))
        );
        assert!(t(json!("not base64!"), Type::BYTEA).is_err());
        assert!(t(json!({"a": 1}), Type::TEXT).is_err());
        assert_eq!(
            t(json!([1, null, [2, 3]]), Type::INT4_ARRAY),
            Ok(Some("{1,NULL,{2,3}}".into()))
        );
        assert_eq!(
            t(json!(["a b", "q\"uote", "back\\slash"]), Type::TEXT_ARRAY),
            Ok(Some(r#"{"a b","q\"uote","back\\slash"}"#.into()))
        );
    }
}
