//! Pipeline and rules files: types, loading with `${NAME}` substitution, and pure
//! validation that reports every problem at once, each with file, line and column.

pub mod diagnostic;
pub mod pipeline;
pub mod rules;
pub mod transport;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use diagnostic::{Diagnostic, Diagnostics, Place, Problem, Severity};
use oppen_connector_api::ColumnType;
pub use pipeline::{Access, OutputFormat, PartitionGrain, PipelineFile, SourceConfig};
pub use rules::{Action, ColumnRule, RulesFile, Unclassified};
use serde::de::DeserializeOwned;
pub use transport::{KafkaTransport, TransportConfig};

use crate::store::StoreLocation;

/// A loaded and validated pipeline, with paths resolved.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline file.
    pub file: PathBuf,
    /// The rules file.
    pub rules_file: PathBuf,
    /// The parsed pipeline file (source paths resolved).
    pub spec: PipelineFile,
    /// The parsed rules.
    pub rules: RulesFile,
    /// Where versions are published.
    pub store: StoreLocation,
    /// Where private state lives.
    pub state: StoreLocation,
}

impl Pipeline {
    /// The dataset id.
    pub fn id(&self) -> &str {
        &self.spec.dataset.id.value
    }

    /// The steward's type for each column that has one.
    pub fn column_types(&self) -> std::collections::BTreeMap<String, ColumnType> {
        self.rules
            .columns
            .0
            .iter()
            .filter_map(|(name, rule)| {
                let t = rule.value.type_.as_ref()?.parse().ok()?;
                Some((name.value.clone(), t))
            })
            .collect()
    }

    /// The rule for a source column, if any.
    pub fn rule(&self, column: &str) -> Option<&ColumnRule> {
        self.rules
            .columns
            .0
            .iter()
            .find(|(n, _)| n.value == column)
            .map(|(_, r)| &r.value)
    }
}

/// Reads a YAML file into `T`, substituting `${NAME}` from the environment in
/// scalar values. Substituted values never appear in error messages.
fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Diagnostic> {
    let text = &protect_decimal_types(text);
    let vars: HashMap<String, String> = std::env::vars().collect();
    let options = serde_saphyr::Options::default().with_properties(vars);
    serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| diagnostic::from_yaml_error(file, &e))
}

/// In a YAML flow mapping (`{ keep: { type: decimal(18,2) } }`) the comma in a
/// decimal type would end the value. Stewards write it that way, so the comma is
/// replaced by a space (same length: line and column numbers stay right), which
/// the type parser accepts too.
fn protect_decimal_types(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("decimal(") {
        let (head, tail) = rest.split_at(i + "decimal(".len());
        out.push_str(head);
        let close = tail.find(')').filter(|&c| c <= 12);
        match close {
            Some(c)
                if tail[..c]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b',' || b == b' ') =>
            {
                out.push_str(&tail[..c].replace(',', " "));
                rest = &tail[c..];
            }
            _ => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

fn read(file: &Path) -> Result<String, Diagnostic> {
    std::fs::read_to_string(file).map_err(|e| {
        let d = Diagnostic::new(Place::file(file), format!("cannot read the file: {e}"));
        if e.kind() == std::io::ErrorKind::NotFound {
            d.hint("check the path; relative paths resolve from the current folder (pipelines) or the pipeline file's folder (rules, data)")
        } else {
            d
        }
    })
}

/// Loads a pipeline file and its rules, resolves paths, and validates both.
/// Touches no source and no store.
pub fn load(file: &Path) -> Result<Pipeline, Diagnostics> {
    let mut problems = Diagnostics::default();
    let text = read(file).map_err(|d| Diagnostics(vec![d]))?;
    let mut spec: PipelineFile = parse_yaml(file, &text).map_err(|d| Diagnostics(vec![d]))?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let rules_file = base.join(&spec.rules.value);
    let rules = match read(&rules_file).and_then(|t| parse_yaml::<RulesFile>(&rules_file, &t)) {
        Ok(rules) => Some(rules),
        Err(d) => {
            let d = if d.place.line == 0 && !rules_file.exists() {
                Diagnostic::new(
                    Place::of(file, &spec.rules),
                    format!("rules file {} does not exist", rules_file.display()),
                )
                .hint("every pipeline needs a rules file that classifies each source column")
            } else {
                d
            };
            problems.push(d);
            None
        }
    };
    match &mut spec.source.value {
        SourceConfig::Files(files) => {
            if files.path.is_relative() {
                files.path = base.join(&files.path);
            }
            if let Some(dl) = &mut files.dead_letter
                && dl.is_relative()
            {
                *dl = base.join(&*dl);
            }
        }
        SourceConfig::Postgres(_) | SourceConfig::Debezium(_) => {}
    }
    let s3 = spec.publish.s3.clone().unwrap_or_default();
    let store = StoreLocation::parse_with(&spec.publish.store.value, &base, &s3)
        .map_err(|e| Diagnostic::new(Place::of(file, &spec.publish.store), e));
    let state = StoreLocation::parse_with(&spec.publish.state.value, &base, &s3)
        .map_err(|e| Diagnostic::new(Place::of(file, &spec.publish.state), e));
    validate_pipeline(file, &spec, &mut problems);
    if let Some(rules) = &rules {
        validate_rules(&rules_file, rules, spec.dataset.access.value, &mut problems);
    }
    if let (Ok(store), Ok(state)) = (&store, &state)
        && store.overlaps(state)
    {
        problems.push(
                Diagnostic::new(Place::of(file, &spec.publish.state), "the state location overlaps the public store")
                    .hint("state holds pseudonymised keys, which are personal data: put it in a private location outside the store"),
            );
    }
    let store = store.map_err(|d| problems.push(d)).ok();
    let state = state.map_err(|d| problems.push(d)).ok();
    match (rules, store, state) {
        (Some(rules), Some(store), Some(state)) if problems.is_empty() => Ok(Pipeline {
            file: file.to_path_buf(),
            rules_file,
            spec,
            rules,
            store,
            state,
        }),
        _ => Err(problems),
    }
}

fn validate_pipeline(file: &Path, spec: &PipelineFile, problems: &mut Diagnostics) {
    let id = &spec.dataset.id;
    if id.value.is_empty()
        || !id
            .value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        problems.push(
            Diagnostic::new(Place::of(file, id), format!("dataset id `{}` is not valid", id.value))
                .hint("use lowercase letters a-z, digits, `-` and `_`; it becomes a folder name and part of URLs"),
        );
    }
    let org = &spec.dataset.publisher.org_nr;
    let digits: String = org.value.chars().filter(char::is_ascii_digit).collect();
    if digits.len() != 10 {
        problems.push(
            Diagnostic::new(
                Place::of(file, org),
                format!(
                    "org_nr `{}` is not a Swedish organisation number",
                    org.value
                ),
            )
            .hint("write it as NNNNNN-NNNN, e.g. 212000-0000"),
        );
    }
    match &spec.source.value {
        SourceConfig::Files(files) => {
            for problem in files.validate() {
                problems.push(Diagnostic::new(
                    Place::of(file, &spec.source),
                    format!("source.files: {problem}"),
                ));
            }
        }
        SourceConfig::Postgres(pg) => {
            for problem in pg.validate() {
                problems.push(Diagnostic::new(
                    Place::of(file, &spec.source),
                    format!("source.postgres: {problem}"),
                ));
            }
        }
        SourceConfig::Debezium(dbz) => {
            for problem in dbz.validate() {
                problems.push(Diagnostic::new(
                    Place::of(file, &spec.source),
                    format!("source.debezium: {problem}"),
                ));
            }
        }
    }
    if let Some(transport) = &spec.transport {
        let TransportConfig::Kafka(kafka) = &transport.value;
        for problem in kafka.validate() {
            problems.push(Diagnostic::new(
                Place::of(file, transport),
                format!("transport.kafka: {problem}"),
            ));
        }
    }
    let publish = &spec.publish;
    if publish.formats.value.is_empty() {
        problems.push(
            Diagnostic::new(Place::of(file, &publish.formats), "formats is empty")
                .hint("list at least one of parquet, csv"),
        );
    }
    if publish.keep_versions.value == 0 {
        problems.push(Diagnostic::new(
            Place::of(file, &publish.keep_versions),
            "keep_versions must be at least 1",
        ));
    }
    if publish.max_file_rows.value == 0 {
        problems.push(Diagnostic::new(
            Place::of(file, &publish.max_file_rows),
            "max_file_rows must be at least 1",
        ));
    }
    if !(publish.interval_seconds.is_finite() && publish.interval_seconds > 0.0) {
        problems.push(Diagnostic::new(
            Place::file(file),
            "publish.interval_seconds must be a positive number",
        ));
    }
    if publish.max_changes == 0 {
        problems.push(Diagnostic::new(
            Place::file(file),
            "publish.max_changes must be at least 1",
        ));
    }
    if let Some(key) = &spec.pseudonym_key
        && let pipeline::KeySource::Env(name) = &key.value
        && std::env::var_os(name).is_none()
    {
        problems.push(
                    Diagnostic::new(Place::of(file, key), format!("environment variable {name} is not set"))
                        .hint("set it to a random secret of at least 32 bytes, or remove pseudonym_key to have one generated in the state location"),
                );
    }
}

fn validate_rules(file: &Path, rules: &RulesFile, access: Access, problems: &mut Diagnostics) {
    let mut published: HashMap<&str, &str> = HashMap::new();
    for (name, rule) in &rules.columns.0 {
        let place = Place::of(file, rule);
        let r = &rule.value;
        if let Some(t) = &r.type_
            && let Err(e) = t.parse::<ColumnType>()
        {
            problems.push(Diagnostic::new(
                place.clone(),
                format!("column `{}`: {e}", name.value),
            ));
        }
        if r.action == Action::Hash && access == Access::Open && r.reason.is_none() {
            problems.push(
                Diagnostic::new(place.clone(), format!("column `{}`: hash is refused for open data", name.value))
                    .hint("a pseudonym is still personal data; use drop or redact, or add `reason:` to { hash: { reason: ... } } if a steward has decided it is safe"),
            );
        }
        if r.allow_identity_numbers && r.reason.is_none() {
            problems.push(
                Diagnostic::new(
                    place.clone(),
                    format!(
                        "column `{}`: allow: personal_identity_number needs a reason",
                        name.value
                    ),
                )
                .hint("add `reason:` saying why identity numbers may be published here"),
            );
        }
        if r.action != Action::Drop {
            let out = r.rename.as_deref().unwrap_or(&name.value);
            if out.starts_with('_') {
                problems.push(Diagnostic::new(
                    place.clone(),
                    format!("published column name `{out}` starts with `_`, which oppen reserves"),
                ));
            }
            if let Some(other) = published.insert(out, &name.value) {
                problems.push(
                    Diagnostic::new(
                        place,
                        format!(
                            "columns `{other}` and `{}` would both be published as `{out}`",
                            name.value
                        ),
                    )
                    .hint("rename one of them"),
                );
            }
        }
    }
    for rule in &rules.rows {
        let rules::RowRule::Suppress(s) = &rule.value;
        let tests = usize::from(s.is.is_some())
            + usize::from(s.in_.is_some())
            + usize::from(s.equals.is_some());
        if tests != 1 {
            problems.push(
                Diagnostic::new(
                    Place::of(file, rule),
                    format!("suppress on `{}` needs exactly one test", s.column),
                )
                .hint("use one of `is: personal_identity_number`, `in: [...]`, `equals: ...`"),
            );
        }
    }
}

/// Problems that need the source's columns: rules naming columns the source does
/// not have, and (with `unclassified: halt`) columns no rule names.
pub fn check_against_columns(pipeline: &Pipeline, columns: &[String]) -> Diagnostics {
    let mut problems = Diagnostics::default();
    let file = &pipeline.rules_file;
    let known = |c: &str| columns.iter().any(|x| x == c);
    let hint = format!("the source has: {}", columns.join(", "));
    for (name, _) in &pipeline.rules.columns.0 {
        if !known(&name.value) {
            problems.push(
                Diagnostic::new(
                    Place::of(file, name),
                    format!(
                        "rule for column `{}`, which the source does not have",
                        name.value
                    ),
                )
                .problem(Problem::RuledColumnMissing)
                .hint(hint.clone()),
            );
        }
    }
    for rule in &pipeline.rules.rows {
        let rules::RowRule::Suppress(s) = &rule.value;
        if !known(&s.column) {
            problems.push(
                Diagnostic::new(
                    Place::of(file, rule),
                    format!(
                        "suppress rule on column `{}`, which the source does not have",
                        s.column
                    ),
                )
                .hint(hint.clone()),
            );
        }
    }
    if pipeline.rules.unclassified == Unclassified::Halt {
        for c in columns {
            if pipeline.rule(c).is_none() {
                problems.push(
                    Diagnostic::new(
                        Place::file(file),
                        format!("column `{c}` has no rule, and unclassified is halt"),
                    )
                    .hint(format!(
                        "add `{c}: drop` (or another action) under columns:"
                    )),
                );
            }
        }
    }
    if let Some(partition) = &pipeline.spec.publish.partition_by {
        let column = &partition.value.column;
        let published = pipeline
            .rule(column)
            .is_some_and(|r| r.action != Action::Drop);
        if !published {
            problems.push(
                Diagnostic::new(
                    Place::of(&pipeline.file, partition),
                    format!("partition column `{column}` is not published"),
                )
                .hint("partition by a column the rules keep or generalize"),
            );
        }
    }
    for key in source_key(pipeline) {
        if !known(key) {
            problems.push(
                Diagnostic::new(
                    Place::of(&pipeline.file, &pipeline.spec.source),
                    format!("key column `{key}` is not in the source"),
                )
                .hint(hint.clone()),
            );
        }
    }
    problems
}

/// The source's key columns as configured.
pub fn source_key(pipeline: &Pipeline) -> &[String] {
    match &pipeline.spec.source.value {
        SourceConfig::Files(f) => &f.key,
        // Empty when the table's primary key is meant; the source resolves it.
        SourceConfig::Postgres(p) => p.key.as_deref().unwrap_or_default(),
        // Empty when the record key's fields are meant; the source reads them.
        SourceConfig::Debezium(d) => d.key.as_deref().unwrap_or_default(),
    }
}
