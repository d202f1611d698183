//! Reads the fields an item binds straight from its JSON text.
//!
//! Parsing the whole item into a `serde_json::Value` built a map of every field, key strings
//! included, only to look a few of them up: nearly half of a consumer's CPU in a table copy.
//! Here the object is walked once: a key is compared where it lies in the text, a field the
//! statement binds becomes a value (a string is moved, not copied, into its parameter), and
//! every other field is checked and skipped without being built.
//!
//! Invariants: the same JSON is accepted and refused as by `serde_json::from_str::<Value>`, at
//! the same line and column (a malformed item is "not valid JSON", whatever it binds; the
//! wording may differ where a skipped field is malformed); a field named twice binds its last
//! value, as the map did.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// What an item's JSON held.
#[derive(Debug, PartialEq)]
pub(super) enum Fields {
    /// An object: the value of each named field, in the order of the names, `None` if absent.
    Object(Vec<Option<Value>>),
    /// Valid JSON, but not an object.
    NotObject,
}

/// The fields `names` of the JSON `text`.
///
/// # Errors
/// The text is not valid JSON (serde_json's message, with line and column).
pub(super) fn read(text: &str, names: &[String]) -> Result<Fields, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = Named(names).deserialize(&mut de)?;
    de.end()?;
    Ok(fields)
}

/// Seeds the walk with the names to pick.
struct Named<'n>(&'n [String]);

impl<'de> DeserializeSeed<'de> for Named<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Named<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut found: Vec<Option<Value>> = vec![None; self.0.len()];
        while let Some(at) = map.next_key_seed(KeyOf(self.0))? {
            match at {
                Some(i) => found[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Fields::Object(found))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Fields, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Fields::NotObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }

    fn visit_unit<E>(self) -> Result<Fields, E> {
        Ok(Fields::NotObject)
    }
}

/// A key, as the index of the name it matches, compared where it lies.
struct KeyOf<'n>(&'n [String]);

impl<'de> DeserializeSeed<'de> for KeyOf<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyOf<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| n == key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_named_fields_are_picked_in_order_and_the_rest_skipped() {
        let got = read(
            r#" {"b": "x\"y", "skip": {"deep": [1, {"a": 9}]}, "a": 1.5, "c": null} "#,
            &names(&["a", "b", "c", "d"]),
        )
        .expect("valid");
        assert_eq!(
            got,
            Fields::Object(vec![
                Some(json!(1.5)),
                Some(json!("x\"y")),
                Some(Value::Null),
                None
            ])
        );
    }

    #[test]
    fn an_escaped_key_matches_and_the_last_of_two_wins() {
        let got = read(r#"{"\u0061": 1, "a": 2}"#, &names(&["a"])).expect("valid");
        assert_eq!(got, Fields::Object(vec![Some(json!(2))]));
    }

    #[test]
    fn valid_json_that_is_not_an_object_says_so() {
        for text in ["[1, {\"a\": 2}]", "3", "-3", "1.5", "\"a\"", "true", "null"] {
            assert_eq!(
                read(text, &names(&["a"])).map_err(|e| e.to_string()),
                Ok(Fields::NotObject),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_json_is_refused_where_serde_json_refuses_it() {
        for text in [
            "{\"a\": 1",
            "{\"a\": 1} x",
            "{\"skip\": [1,], \"a\": 1}",
            "{\"skip\": nul, \"a\": 1}",
            "",
            "{\"a\": \"\\q\"}",
            "1e400",
        ] {
            let at = |e: serde_json::Error| (e.line(), e.column());
            let ours = read(text, &names(&["a"])).map(|_| ()).map_err(at);
            let theirs = serde_json::from_str::<Value>(text).map(|_| ()).map_err(at);
            assert!(ours.is_err(), "{text}");
            assert_eq!(ours, theirs, "{text}");
        }
    }
}
