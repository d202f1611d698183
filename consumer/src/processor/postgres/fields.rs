//! Reads the fields an item binds straight from its JSON text.
//!
//! Parsing the whole item into a `serde_json::Value` built a map of every field, key strings
//! included, only to look a few of them up: nearly half of a consumer's CPU in a table copy.
//! Here the object is walked once: a key is compared where it lies in the text, a field the
//! statement binds becomes a value (a string is moved, not copied, into its parameter), and
//! every other field is checked and skipped without being built.
//!
//! A field's value is built as a `serde_json::Value`, or as a [`Scalar`], which holds a string
//! without escapes as a slice of the item's own text: no copy at all until it is bound.
//!
//! Invariants: the same JSON is accepted and refused as by `serde_json::from_str::<Value>`, at
//! the same line and column (a malformed item is "not valid JSON", whatever it binds; the
//! wording may differ where a skipped field is malformed); a field named twice binds its last
//! value, as the map did; a [`Scalar`] turns into the very `Value` the field would have been.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::{Number, Value};

/// What an item's JSON held.
#[derive(Debug, PartialEq)]
pub(super) enum Fields<V> {
    /// An object: the value of each named field, in the order of the names, `None` if absent.
    Object(Vec<Option<V>>),
    /// Valid JSON, but not an object.
    NotObject,
}

/// The fields `names` of the JSON `text`, each as a `V` (a `Value` or a [`Scalar`]).
///
/// # Errors
/// The text is not valid JSON (serde_json's message, with line and column).
pub(super) fn read<'de, V: Deserialize<'de>>(
    text: &'de str,
    names: &[String],
) -> Result<Fields<V>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = Named(names, PhantomData).deserialize(&mut de)?;
    de.end()?;
    Ok(fields)
}

/// A field's value, a string borrowed from the item's text where it holds no escape.
#[derive(Debug, PartialEq)]
pub(super) enum Scalar<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    /// An array or an object.
    Other(Value),
}

impl Scalar<'_> {
    /// The `Value` the field would have been.
    pub(super) fn into_value(self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Number(n) => Value::Number(n),
            Scalar::Str(s) => Value::String(s.into_owned()),
            Scalar::Other(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Builds a [`Scalar`] as `Value`'s own visitor builds a `Value`.
struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(n.into()))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Scalar<'de>, E> {
        Ok(Number::from_f64(n).map_or(Scalar::Null, Scalar::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s)))
    }

    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map)).map(Scalar::Other)
    }
}

/// Seeds the walk with the names to pick.
struct Named<'n, V>(&'n [String], PhantomData<V>);

impl<'de, V: Deserialize<'de>> DeserializeSeed<'de> for Named<'_, V> {
    type Value = Fields<V>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields<V>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, V: Deserialize<'de>> Visitor<'de> for Named<'_, V> {
    type Value = Fields<V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<V>, A::Error> {
        let mut found: Vec<Option<V>> =
            std::iter::repeat_with(|| None).take(self.0.len()).collect();
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

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Fields<V>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Fields::NotObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Fields<V>, E> {
        Ok(Fields::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Fields<V>, E> {
        Ok(Fields::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Fields<V>, E> {
        Ok(Fields::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Fields<V>, E> {
        Ok(Fields::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Fields<V>, E> {
        Ok(Fields::NotObject)
    }

    fn visit_unit<E>(self) -> Result<Fields<V>, E> {
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
        let got = read::<Value>(
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
        let got = read::<Value>(r#"{"\u0061": 1, "a": 2}"#, &names(&["a"])).expect("valid");
        assert_eq!(got, Fields::Object(vec![Some(json!(2))]));
    }

    #[test]
    fn valid_json_that_is_not_an_object_says_so() {
        for text in ["[1, {\"a\": 2}]", "3", "-3", "1.5", "\"a\"", "true", "null"] {
            assert_eq!(
                read::<Value>(text, &names(&["a"])).map_err(|e| e.to_string()),
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
            let ours = read::<Value>(text, &names(&["a"])).map(|_| ()).map_err(at);
            let theirs = serde_json::from_str::<Value>(text).map(|_| ()).map_err(at);
            assert!(ours.is_err(), "{text}");
            assert_eq!(ours, theirs, "{text}");
        }
    }

    #[test]
    fn a_scalar_is_the_value_the_field_would_have_been() {
        let text = r#"{"s": "plain", "e": "tab\there", "n": -3, "u": 18446744073709551615,
            "f": 1.50, "b": false, "z": null, "a": [1, "x", {"k": null}], "o": {"k": [2]}}"#;
        let all = names(&["s", "e", "n", "u", "f", "b", "z", "a", "o", "missing"]);
        let (Fields::Object(scalars), Fields::Object(values)) = (
            read::<Scalar>(text, &all).expect("valid"),
            read::<Value>(text, &all).expect("valid"),
        ) else {
            panic!("objects")
        };
        assert!(matches!(
            scalars[0],
            Some(Scalar::Str(Cow::Borrowed("plain")))
        ));
        assert!(matches!(&scalars[1], Some(Scalar::Str(Cow::Owned(s))) if s == "tab\there"));
        let scalars: Vec<Option<Value>> = scalars
            .into_iter()
            .map(|s| s.map(Scalar::into_value))
            .collect();
        assert_eq!(scalars, values);
        assert_eq!(
            read::<Scalar>("[1]", &all).map_err(|e| e.to_string()),
            Ok(Fields::NotObject)
        );
    }
}
