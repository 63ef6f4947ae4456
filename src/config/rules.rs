//! The steward's rules file: one action per source column, row suppression, and
//! what happens to columns no rule names.

use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

/// A whole rules file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// One rule per source column, in file order.
    pub columns: ColumnRules,
    /// Rows to leave out of the published data.
    #[serde(default)]
    pub rows: Vec<Spanned<RowRule>>,
    /// What happens to a source column no rule names.
    #[serde(default)]
    pub unclassified: Unclassified,
}

/// Column rules in file order, each with where it was written.
#[derive(Debug, Default)]
pub struct ColumnRules(pub Vec<(Spanned<String>, Spanned<ColumnRule>)>);

impl<'de> Deserialize<'de> for ColumnRules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RulesVisitor;
        impl<'de> Visitor<'de> for RulesVisitor {
            type Value = ColumnRules;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from column name to action")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ColumnRules, A::Error> {
                let mut rules: Vec<(Spanned<String>, Spanned<ColumnRule>)> = Vec::new();
                while let Some((name, rule)) =
                    map.next_entry::<Spanned<String>, Spanned<ColumnRule>>()?
                {
                    if rules.iter().any(|(n, _)| n.value == name.value) {
                        return Err(de::Error::custom(format!(
                            "column `{}` has two rules; give each column exactly one",
                            name.value
                        )));
                    }
                    rules.push((name, rule));
                }
                Ok(ColumnRules(rules))
            }
        }
        deserializer.deserialize_map(RulesVisitor)
    }
}

/// What happens to a source column no rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unclassified {
    /// Leave it out, with a warning, a metric and a line in `oppen status`.
    #[default]
    Drop,
    /// Stop the pipeline until a steward classifies it.
    Halt,
}

/// The rule for one column: an action and its options.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnRule {
    /// What is done to the values.
    pub action: Action,
    /// The published column name, when not the source name.
    pub rename: Option<String>,
    /// The type to read the source values as (text sources), e.g. `decimal(18,2)`.
    pub type_: Option<String>,
    /// Why a steward allows something the defaults refuse (hash on open data,
    /// identity numbers in a kept column).
    pub reason: Option<String>,
    /// Identity numbers are allowed in this column (needs a reason).
    pub allow_identity_numbers: bool,
}

/// What is done to a column's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Published as is.
    Keep,
    /// Never leaves the connector.
    Drop,
    /// A keyed HMAC-SHA-256 token.
    Hash,
    /// Only part of the value stays visible.
    Mask { keep_first: usize, keep_last: usize },
    /// A coarser value.
    Generalize(Generalize),
    /// Identity numbers, e-mail addresses and phone numbers in free text replaced by markers.
    Redact,
}

impl Action {
    /// The action's name as written in rules files.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::Hash => "hash",
            Action::Mask { .. } => "mask",
            Action::Generalize(_) => "generalize",
            Action::Redact => "redact",
        }
    }
}

/// How `generalize` coarsens a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Generalize {
    /// A date or timestamp to its year (`2025`).
    Year,
    /// A date or timestamp to its month (`2025-03`).
    Month,
    /// A number down to a multiple of the step (a bucket's lower bound).
    Step(f64),
    /// A number rounded to this many decimals (coordinates).
    Decimals(u32),
    /// Text to its first characters (postal code `123 45` to `123`).
    Prefix(usize),
}

/// Characters `mask` keeps when no option is given: the last four.
pub const DEFAULT_MASK_KEEP_LAST: usize = 4;

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionRepr {
    Keep(#[serde(default)] KeepOptions),
    Drop(#[serde(default)] NoOptions),
    Hash(#[serde(default)] CommonOptions),
    Mask(#[serde(default)] MaskOptions),
    Generalize(GeneralizeOptions),
    Redact(#[serde(default)] CommonOptions),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommonOptions {
    #[serde(rename = "type")]
    type_: Option<String>,
    rename: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeepOptions {
    #[serde(rename = "type")]
    type_: Option<String>,
    rename: Option<String>,
    reason: Option<String>,
    /// `personal_identity_number`: the column may hold identity numbers.
    allow: Option<Allow>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Allow {
    PersonalIdentityNumber,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MaskOptions {
    #[serde(rename = "type")]
    type_: Option<String>,
    rename: Option<String>,
    keep_first: Option<usize>,
    keep_last: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GeneralizeOptions {
    #[serde(rename = "type")]
    type_: Option<String>,
    rename: Option<String>,
    to: Option<DateGrain>,
    step: Option<f64>,
    decimals: Option<u32>,
    prefix: Option<usize>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum DateGrain {
    Year,
    Month,
}

impl ColumnRule {
    fn simple(action: Action) -> Self {
        Self {
            action,
            rename: None,
            type_: None,
            reason: None,
            allow_identity_numbers: false,
        }
    }

    fn from_repr<E: de::Error>(repr: ActionRepr) -> Result<Self, E> {
        Ok(match repr {
            ActionRepr::Keep(o) => Self {
                action: Action::Keep,
                rename: o.rename,
                type_: o.type_,
                allow_identity_numbers: matches!(o.allow, Some(Allow::PersonalIdentityNumber)),
                reason: o.reason,
            },
            ActionRepr::Drop(NoOptions {}) => Self::simple(Action::Drop),
            ActionRepr::Hash(o) => Self {
                rename: o.rename,
                type_: o.type_,
                reason: o.reason,
                ..Self::simple(Action::Hash)
            },
            ActionRepr::Redact(o) => Self {
                rename: o.rename,
                type_: o.type_,
                reason: o.reason,
                ..Self::simple(Action::Redact)
            },
            ActionRepr::Mask(o) => {
                let (keep_first, keep_last) = match (o.keep_first, o.keep_last) {
                    (None, None) => (0, DEFAULT_MASK_KEEP_LAST),
                    (first, last) => (first.unwrap_or(0), last.unwrap_or(0)),
                };
                Self {
                    rename: o.rename,
                    type_: o.type_,
                    ..Self::simple(Action::Mask {
                        keep_first,
                        keep_last,
                    })
                }
            }
            ActionRepr::Generalize(o) => {
                let chosen: Vec<Generalize> = [
                    o.to.map(|g| match g {
                        DateGrain::Year => Generalize::Year,
                        DateGrain::Month => Generalize::Month,
                    }),
                    o.step.map(Generalize::Step),
                    o.decimals.map(Generalize::Decimals),
                    o.prefix.map(Generalize::Prefix),
                ]
                .into_iter()
                .flatten()
                .collect();
                let [how] = <[Generalize; 1]>::try_from(chosen).map_err(|_| {
                    E::custom(
                        "generalize takes exactly one of `to: year|month` (dates), `step: N` \
                         (numbers to buckets), `decimals: N` (rounding, e.g. coordinates) or \
                         `prefix: N` (text such as postal codes)",
                    )
                })?;
                if let Generalize::Step(step) = how
                    && !(step.is_finite() && step > 0.0)
                {
                    return Err(E::custom("generalize step must be a positive number"));
                }
                Self {
                    rename: o.rename,
                    type_: o.type_,
                    ..Self::simple(Action::Generalize(how))
                }
            }
        })
    }
}

const ACTIONS: &[&str] = &["keep", "drop", "hash", "mask", "generalize", "redact"];

impl<'de> Deserialize<'de> for ColumnRule {
    /// A column rule is an action name (`keep`), or a map from one action name to
    /// its options (`{ keep: { type: decimal(18,2) } }`).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = ColumnRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an action (keep, drop, hash, mask, generalize, redact), or a map from one action to its options")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ColumnRule, E> {
                match v {
                    "keep" => Ok(ColumnRule::simple(Action::Keep)),
                    "drop" => Ok(ColumnRule::simple(Action::Drop)),
                    "hash" => Ok(ColumnRule::simple(Action::Hash)),
                    "redact" => Ok(ColumnRule::simple(Action::Redact)),
                    "mask" => Ok(ColumnRule::simple(Action::Mask {
                        keep_first: 0,
                        keep_last: DEFAULT_MASK_KEEP_LAST,
                    })),
                    "generalize" => Err(E::custom(
                        "generalize needs an option, e.g. `{ generalize: { to: month } }`",
                    )),
                    other => Err(E::unknown_variant(other, ACTIONS)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ColumnRule, A::Error> {
                let repr = ActionRepr::deserialize(de::value::MapAccessDeserializer::new(map))?;
                ColumnRule::from_repr(repr)
            }
        }
        deserializer.deserialize_any(RuleVisitor)
    }
}

/// A row rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RowRule {
    /// Leave matching rows out; a row that becomes suppressed is a delete.
    Suppress(Suppress),
}

/// Which rows to suppress: `column` and exactly one test.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suppress {
    /// The source column tested.
    pub column: String,
    /// The value is of this kind.
    #[serde(default)]
    pub is: Option<Detected>,
    /// The value is one of these.
    #[serde(default, rename = "in")]
    pub in_: Option<ScalarList>,
    /// The value is exactly this.
    #[serde(default)]
    pub equals: Option<Scalar>,
    /// Why, for reviewers.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Kinds of values a detector recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detected {
    /// A personnummer or a samordningsnummer.
    PersonalIdentityNumber,
    /// A personnummer only.
    Personnummer,
    /// A samordningsnummer only.
    Samordningsnummer,
    /// An e-mail address.
    EmailAddress,
}

/// A YAML scalar read as text (`4690` and `"4690"` are the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

/// A list of scalars read as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalarList(pub Vec<String>);

struct ScalarVisitor;
impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a text, number or boolean")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl<'de> Deserialize<'de> for ScalarList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = ScalarList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ScalarList, A::Error> {
                let mut values = Vec::new();
                while let Some(Scalar(v)) = seq.next_element()? {
                    values.push(v);
                }
                Ok(ScalarList(values))
            }
        }
        deserializer.deserialize_seq(ListVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RulesFile, serde_saphyr::Error> {
        serde_saphyr::from_str(text)
    }

    #[test]
    fn reads_every_action_form() {
        let rules = parse(
            "columns:\n  a: keep\n  b: { keep: { type: integer, rename: bb } }\n  c: drop\n  d: redact\n  \
             e: { mask: { keep_first: 2 } }\n  f: { generalize: { to: month } }\n  g: { hash: { reason: r } }\n\
             rows:\n  - suppress: { column: a, in: [1, \"2\"] }\n  - suppress: { column: a, equals: 3 }\n\
             unclassified: halt\n",
        )
        .unwrap();
        let actions: Vec<&str> = rules
            .columns
            .0
            .iter()
            .map(|(_, r)| r.value.action.name())
            .collect();
        assert_eq!(
            actions,
            [
                "keep",
                "keep",
                "drop",
                "redact",
                "mask",
                "generalize",
                "hash"
            ]
        );
        assert_eq!(rules.columns.0[1].1.value.rename.as_deref(), Some("bb"));
        assert_eq!(
            rules.columns.0[4].1.value.action,
            Action::Mask {
                keep_first: 2,
                keep_last: 0
            }
        );
        let RowRule::Suppress(s) = &rules.rows[0].value;
        assert_eq!(s.in_, Some(ScalarList(vec!["1".into(), "2".into()])));
        assert_eq!(rules.unclassified, Unclassified::Halt);
    }

    #[test]
    fn refuses_what_is_not_a_rule() {
        for (text, expected) in [
            ("columns:\n  a: scramble\n", "unknown variant `scramble`"),
            ("columns:\n  a: generalize\n", "generalize needs an option"),
            (
                "columns:\n  a: { generalize: { to: month, step: 5 } }\n",
                "exactly one of",
            ),
            (
                "columns:\n  a: { keep: { colour: red } }\n",
                "unknown field `colour`",
            ),
            ("columns:\n  a: keep\n  a: drop\n", "duplicate mapping key"),
            ("columns: {}\nextra: 1\n", "unknown field `extra`"),
        ] {
            let error = parse(text).map(|_| ()).unwrap_err();
            let rendered = error.to_string();
            assert!(rendered.contains(expected), "{text:?}: {rendered}");
            assert!(error.location().is_some(), "{text:?} has no location");
        }
    }

    proptest::proptest! {
        /// Any text: the rules parser returns a value or an error, never panics.
        #[test]
        fn parser_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }
}
