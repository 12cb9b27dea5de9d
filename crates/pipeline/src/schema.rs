//! The types a topic's JSON records are declared with.

use std::fmt;
use std::str::FromStr;

/// Largest decimal precision (Arrow's Decimal128 and Iceberg's decimal).
pub const DECIMAL_PRECISION_MAX: u8 = 38;

/// The type of one field of a topic's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum FieldType {
    String,
    Boolean,
    /// 32-bit integer.
    Int,
    /// 64-bit integer.
    Bigint,
    /// 64-bit float.
    Double,
    /// Exact decimal with `precision` digits, `scale` of them after the point.
    Decimal {
        precision: u8,
        scale: u8,
    },
    /// A calendar day, `"2026-11-25"` in JSON.
    Date,
    /// An instant: RFC 3339 text or epoch milliseconds in JSON.
    Timestamp,
    /// Any JSON value, kept as JSON text; its fields are reached with JSON functions.
    Json,
}

/// The type names, as written in topic files.
pub const TYPE_NAMES: [&str; 9] = [
    "string",
    "boolean",
    "int",
    "bigint",
    "double",
    "decimal(p,s)",
    "date",
    "timestamp",
    "json",
];

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldType::String => f.write_str("string"),
            FieldType::Boolean => f.write_str("boolean"),
            FieldType::Int => f.write_str("int"),
            FieldType::Bigint => f.write_str("bigint"),
            FieldType::Double => f.write_str("double"),
            FieldType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            FieldType::Date => f.write_str("date"),
            FieldType::Timestamp => f.write_str("timestamp"),
            FieldType::Json => f.write_str("json"),
        }
    }
}

impl From<FieldType> for String {
    fn from(t: FieldType) -> String {
        t.to_string()
    }
}

impl FromStr for FieldType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "string" => FieldType::String,
            "boolean" => FieldType::Boolean,
            "int" => FieldType::Int,
            "bigint" => FieldType::Bigint,
            "double" => FieldType::Double,
            "date" => FieldType::Date,
            "timestamp" => FieldType::Timestamp,
            "json" => FieldType::Json,
            "decimal" => {
                return Err("`decimal` needs a precision and a scale, like decimal(10,2)".into());
            }
            _ => {
                if let Some(args) = t.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')')) {
                    return parse_decimal(args);
                }
                let known: Vec<&str> = TYPE_NAMES
                    .iter()
                    .map(|n| n.split('(').next().unwrap_or(n))
                    .collect();
                let hint = crate::diagnostic::did_you_mean(&t, known.iter().copied())
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown type `{s}`; types are: {}{hint}",
                    TYPE_NAMES.join(", ")
                ));
            }
        })
    }
}

fn parse_decimal(args: &str) -> Result<FieldType, String> {
    let bad = || format!("`decimal({args})` needs a precision and a scale, like decimal(10,2)");
    let (p, s) = args.split_once(',').ok_or_else(bad)?;
    let precision: u8 = p.trim().parse().map_err(|_| bad())?;
    let scale: u8 = s.trim().parse().map_err(|_| bad())?;
    if precision == 0 || precision > DECIMAL_PRECISION_MAX {
        return Err(format!(
            "decimal precision must be 1..={DECIMAL_PRECISION_MAX}, not {precision}"
        ));
    }
    if scale > precision {
        return Err(format!(
            "decimal scale {scale} is larger than its precision {precision}"
        ));
    }
    Ok(FieldType::Decimal { precision, scale })
}

/// One declared field of a topic's records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: FieldType,
    /// A record without this field (or with `null`) is rejected when `true`.
    pub required: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_and_print() {
        for name in [
            "string",
            "boolean",
            "int",
            "bigint",
            "double",
            "date",
            "timestamp",
            "json",
            "decimal(10,2)",
        ] {
            assert_eq!(name.parse::<FieldType>().unwrap().to_string(), name);
        }
        assert_eq!(
            " Decimal( 38 , 0 ) ".parse::<FieldType>().unwrap(),
            FieldType::Decimal {
                precision: 38,
                scale: 0
            }
        );
        assert!(
            "decimal(39,2)"
                .parse::<FieldType>()
                .unwrap_err()
                .contains("1..=38")
        );
        assert!(
            "decimal(4,5)"
                .parse::<FieldType>()
                .unwrap_err()
                .contains("larger than its precision")
        );
        assert!("decimal".parse::<FieldType>().is_err());
        let err = "strng".parse::<FieldType>().unwrap_err();
        assert!(err.contains("did you mean `string`?"), "{err}");
    }
}
