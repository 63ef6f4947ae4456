//! The catalog: DCAT-AP-SE 3.0 descriptions of every dataset in a store
//! (`catalog.rdf`, which the national data portal harvests, and `catalog.jsonld`),
//! and a Frictionless `datapackage.json` per dataset.
//!
//! Each publisher keeps `<dataset>/dataset.json` (the pipeline's description plus
//! what the data says: first and newest version time, temporal coverage, sizes)
//! current after every commit; the catalog is then rebuilt from all of them, so
//! several pipelines sharing a store all appear in one catalog.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use oxrdf::{BlankNode, Literal, NamedNode, NamedOrBlankNode, Term, Triple};
use serde::{Deserialize, Serialize};

use super::manifest::Version;
use crate::config::OutputFormat;
use crate::store::Store;

const DCAT: &str = "http://www.w3.org/ns/dcat#";
const DCT: &str = "http://purl.org/dc/terms/";
const FOAF: &str = "http://xmlns.com/foaf/0.1/";
const VCARD: &str = "http://www.w3.org/2006/vcard/ns#";
const RDF_TYPE: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type";
const XSD: &str = "http://www.w3.org/2001/XMLSchema#";
const EU: &str = "http://publications.europa.eu/resource/authority/";
/// The catalog's own licence: metadata is always CC0.
pub const CC0: &str = "http://creativecommons.org/publicdomain/zero/1.0/";

/// What the catalog says about one dataset; kept in `<dataset>/dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename = "oppen.dataset/1")]
pub struct DatasetMeta {
    /// Dataset id.
    pub id: String,
    /// Title (Swedish).
    pub title: String,
    /// Description (Swedish).
    pub description: String,
    /// Publishing organisation.
    pub publisher: String,
    /// Its organisation number, digits only.
    pub org_nr: String,
    /// Contact e-mail.
    pub contact: String,
    /// SPDX licence identifier.
    pub license: String,
    /// The specification the data follows.
    pub conforms_to: Option<String>,
    /// EU frequency code (e.g. MONTHLY).
    pub accrual: Option<String>,
    /// EU access-right code (PUBLIC, RESTRICTED, NON_PUBLIC).
    pub access: String,
    /// Keywords (Swedish).
    pub keywords: Vec<String>,
    /// EU data-theme codes.
    pub themes: Vec<String>,
    /// Published columns that identify a row (for datapackage.json), if all are published.
    pub primary_key: Vec<String>,
    /// When the first version was committed.
    pub issued: Option<DateTime<Utc>>,
    /// When the newest version was committed.
    pub modified: Option<DateTime<Utc>>,
    /// Temporal coverage of the data, from its first date or timestamp column.
    pub temporal: Option<(NaiveDate, NaiveDate)>,
    /// The newest version's files: partition → format → (path under the dataset, bytes).
    pub files: BTreeMap<String, BTreeMap<OutputFormat, (String, u64)>>,
    /// The published columns and their Arrow types.
    pub columns: Vec<(String, String)>,
    /// Rows in the newest version.
    pub rows: u64,
}

/// The IRI of a licence, exactly as the licence itself gives it.
pub fn licence_iri(spdx: &str) -> String {
    match spdx.to_ascii_uppercase().as_str() {
        "CC0-1.0" => CC0.to_string(),
        "CC-BY-4.0" => "http://creativecommons.org/licenses/by/4.0/".to_string(),
        "CC-BY-SA-4.0" => "http://creativecommons.org/licenses/by-sa/4.0/".to_string(),
        _ => format!("https://spdx.org/licenses/{spdx}.html"),
    }
}

fn format_iri(format: OutputFormat) -> String {
    match format {
        OutputFormat::Csv => format!("{EU}file-type/CSV"),
        OutputFormat::Parquet => format!("{EU}file-type/PARQUET"),
    }
}

fn media_type(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Csv => "text/csv",
        OutputFormat::Parquet => "application/vnd.apache.parquet",
    }
}

fn node(iri: &str) -> NamedNode {
    // Every IRI here is built from absolute constants and escaped parts.
    NamedNode::new(iri).unwrap_or_else(|_| NamedNode::new_unchecked(iri.replace(' ', "%20")))
}

/// Builds triples with little ceremony.
struct Graph {
    triples: Vec<Triple>,
}

impl Graph {
    fn add(
        &mut self,
        subject: impl Into<NamedOrBlankNode>,
        predicate: &str,
        object: impl Into<Term>,
    ) {
        self.triples
            .push(Triple::new(subject, node(predicate), object));
    }
    fn iri(&mut self, subject: &NamedNode, predicate: &str, iri: &str) {
        self.add(subject.clone(), predicate, node(iri));
    }
    fn sv(&mut self, subject: &NamedNode, predicate: &str, text: &str) {
        let literal = Literal::new_language_tagged_literal(text, "sv")
            .unwrap_or_else(|_| Literal::new_simple_literal(text));
        self.add(subject.clone(), predicate, literal);
    }
    fn typed(
        &mut self,
        subject: impl Into<NamedOrBlankNode>,
        predicate: &str,
        value: String,
        datatype: &str,
    ) {
        self.add(
            subject,
            predicate,
            Literal::new_typed_literal(value, node(&format!("{XSD}{datatype}"))),
        );
    }
}

/// Percent-encodes a path segment for an IRI (`@` may stay: a path character, RFC 3986).
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'@' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn publisher_iri(org_nr: &str) -> String {
    format!("http://dataportal.se/organisation/SE{org_nr}")
}

/// The catalog's triples for every dataset; `base` is where the store is served.
fn triples(base: &str, datasets: &[DatasetMeta]) -> Vec<Triple> {
    let base = base.trim_end_matches('/');
    let mut g = Graph {
        triples: Vec::new(),
    };
    let catalog = node(&format!("{base}/catalog"));
    g.iri(&catalog, RDF_TYPE, &format!("{DCAT}Catalog"));
    let publisher = datasets
        .first()
        .map(|d| (d.publisher.clone(), d.org_nr.clone()));
    let (name, org) = publisher.unwrap_or_default();
    g.sv(
        &catalog,
        &format!("{DCT}title"),
        &format!("Öppna data från {name}"),
    );
    g.sv(
        &catalog,
        &format!("{DCT}description"),
        &format!("Datamängder som {name} publicerar och håller aktuella."),
    );
    g.iri(&catalog, &format!("{DCT}license"), CC0);
    g.iri(
        &catalog,
        &format!("{DCT}language"),
        &format!("{EU}language/SWE"),
    );
    if !org.is_empty() {
        g.iri(&catalog, &format!("{DCT}publisher"), &publisher_iri(&org));
    }
    if let Some(modified) = datasets.iter().filter_map(|d| d.modified).max() {
        g.typed(
            catalog.clone(),
            &format!("{DCT}modified"),
            modified.to_rfc3339(),
            "dateTime",
        );
    }
    let mut agents = BTreeMap::new();
    for d in datasets {
        agents.insert(d.org_nr.clone(), d.publisher.clone());
        let dataset = node(&format!("{base}/{}", segment(&d.id)));
        g.iri(&catalog, &format!("{DCAT}dataset"), dataset.as_str());
        g.iri(&dataset, RDF_TYPE, &format!("{DCAT}Dataset"));
        g.sv(&dataset, &format!("{DCT}title"), &d.title);
        g.sv(&dataset, &format!("{DCT}description"), &d.description);
        g.add(
            dataset.clone(),
            &format!("{DCT}identifier"),
            Literal::new_simple_literal(dataset.as_str()),
        );
        g.iri(
            &dataset,
            &format!("{DCT}publisher"),
            &publisher_iri(&d.org_nr),
        );
        let contact = node(&format!("{}#contact", dataset.as_str()));
        g.iri(&dataset, &format!("{DCAT}contactPoint"), contact.as_str());
        g.iri(&contact, RDF_TYPE, &format!("{VCARD}Organization"));
        g.add(
            contact.clone(),
            &format!("{VCARD}fn"),
            Literal::new_simple_literal(d.publisher.clone()),
        );
        g.iri(
            &contact,
            &format!("{VCARD}hasEmail"),
            &format!("mailto:{}", d.contact),
        );
        for keyword in &d.keywords {
            g.sv(&dataset, &format!("{DCAT}keyword"), keyword);
        }
        for theme in &d.themes {
            g.iri(
                &dataset,
                &format!("{DCAT}theme"),
                &format!("{EU}data-theme/{}", theme.to_ascii_uppercase()),
            );
        }
        if let Some(spec) = &d.conforms_to {
            g.iri(&dataset, &format!("{DCT}conformsTo"), spec);
        }
        g.iri(
            &dataset,
            &format!("{DCT}accessRights"),
            &format!("{EU}access-right/{}", d.access),
        );
        if let Some(accrual) = &d.accrual {
            g.iri(
                &dataset,
                &format!("{DCT}accrualPeriodicity"),
                &format!("{EU}frequency/{accrual}"),
            );
        }
        if let Some(issued) = d.issued {
            g.typed(
                dataset.clone(),
                &format!("{DCT}issued"),
                issued.to_rfc3339(),
                "dateTime",
            );
        }
        if let Some(modified) = d.modified {
            g.typed(
                dataset.clone(),
                &format!("{DCT}modified"),
                modified.to_rfc3339(),
                "dateTime",
            );
        }
        if let Some((start, end)) = d.temporal {
            // The one blank node DCAT-AP-SE allows: the period of time.
            let period =
                BlankNode::new_unchecked(format!("period{}", segment(&d.id).replace('%', "_")));
            g.add(dataset.clone(), &format!("{DCT}temporal"), period.clone());
            g.add(
                period.clone(),
                RDF_TYPE,
                node(&format!("{DCT}PeriodOfTime")),
            );
            g.typed(
                period.clone(),
                &format!("{DCAT}startDate"),
                start.to_string(),
                "date",
            );
            g.typed(period, &format!("{DCAT}endDate"), end.to_string(), "date");
        }
        let formats: Vec<OutputFormat> = {
            let mut f: Vec<OutputFormat> =
                d.files.values().flat_map(|m| m.keys().copied()).collect();
            f.sort();
            f.dedup();
            f
        };
        for format in formats {
            let dist = node(&format!(
                "{}/distribution/{}",
                dataset.as_str(),
                format.extension()
            ));
            g.iri(&dataset, &format!("{DCAT}distribution"), dist.as_str());
            g.iri(&dist, RDF_TYPE, &format!("{DCAT}Distribution"));
            g.sv(
                &dist,
                &format!("{DCT}title"),
                &format!("{} ({})", d.title, format.extension().to_uppercase()),
            );
            g.iri(
                &dist,
                &format!("{DCAT}accessURL"),
                &format!("{}/latest/", dataset.as_str()),
            );
            let mut size = 0;
            for (partition, files) in &d.files {
                if let Some((_, bytes)) = files.get(&format) {
                    size += bytes;
                    let url = format!(
                        "{}/latest/{}.{}",
                        dataset.as_str(),
                        segment(partition),
                        format.extension()
                    );
                    g.iri(&dist, &format!("{DCAT}downloadURL"), &url);
                }
            }
            g.iri(&dist, &format!("{DCT}format"), &format_iri(format));
            g.iri(
                &dist,
                &format!("{DCAT}mediaType"),
                &format!(
                    "https://www.iana.org/assignments/media-types/{}",
                    media_type(format)
                ),
            );
            g.iri(&dist, &format!("{DCT}license"), &licence_iri(&d.license));
            g.typed(
                dist,
                &format!("{DCAT}byteSize"),
                size.to_string(),
                "nonNegativeInteger",
            );
        }
    }
    for (org, name) in agents {
        let agent = node(&publisher_iri(&org));
        g.iri(&agent, RDF_TYPE, &format!("{FOAF}Organization"));
        g.add(
            agent.clone(),
            &format!("{FOAF}name"),
            Literal::new_simple_literal(name),
        );
        g.iri(
            &agent,
            &format!("{DCT}type"),
            "http://purl.org/adms/publishertype/LocalAuthority",
        );
    }
    g.triples
}

/// The catalog as RDF/XML.
pub fn rdf_xml(base: &str, datasets: &[DatasetMeta]) -> std::io::Result<Vec<u8>> {
    let mut serializer = oxrdfxml::RdfXmlSerializer::new();
    for (prefix, iri) in [
        ("dcat", DCAT),
        ("dcterms", DCT),
        ("foaf", FOAF),
        ("vcard", VCARD),
    ] {
        serializer = serializer
            .with_prefix(prefix, iri)
            .map_err(std::io::Error::other)?;
    }
    let mut writer = serializer.for_writer(Vec::new());
    // Each subject's triples together (in order of first appearance) give one
    // element per resource in the XML.
    let mut triples = triples(base, datasets);
    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    for (i, t) in triples.iter().enumerate() {
        first.entry(t.subject.to_string()).or_insert(i);
    }
    triples.sort_by_key(|t| first.get(&t.subject.to_string()).copied().unwrap_or(0));
    for triple in triples {
        writer.serialize_triple(&triple)?;
    }
    writer.finish()
}

/// The catalog as JSON-LD (expanded form: one object per subject, full IRIs).
pub fn json_ld(base: &str, datasets: &[DatasetMeta]) -> serde_json::Value {
    let mut subjects: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
        BTreeMap::new();
    for t in triples(base, datasets) {
        let id = match &t.subject {
            NamedOrBlankNode::NamedNode(n) => n.as_str().to_string(),
            NamedOrBlankNode::BlankNode(b) => format!("_:{}", b.as_str()),
            #[allow(unreachable_patterns)]
            _ => continue,
        };
        let entry = subjects.entry(id.clone()).or_default();
        entry.insert("@id".into(), id.into());
        let value = match &t.object {
            Term::NamedNode(n) if t.predicate.as_str() == RDF_TYPE => {
                let types = entry
                    .entry("@type")
                    .or_insert_with(|| serde_json::json!([]));
                if let Some(list) = types.as_array_mut() {
                    list.push(n.as_str().into());
                }
                continue;
            }
            Term::NamedNode(n) => serde_json::json!({ "@id": n.as_str() }),
            Term::BlankNode(b) => serde_json::json!({ "@id": format!("_:{}", b.as_str()) }),
            Term::Literal(l) => match l.language() {
                Some(lang) => serde_json::json!({ "@value": l.value(), "@language": lang }),
                None if l.datatype().as_str() == format!("{XSD}string") => {
                    serde_json::json!({ "@value": l.value() })
                }
                None => serde_json::json!({ "@value": l.value(), "@type": l.datatype().as_str() }),
            },
            #[allow(unreachable_patterns)]
            _ => continue,
        };
        let values = entry
            .entry(t.predicate.as_str().to_string())
            .or_insert_with(|| serde_json::json!([]));
        if let Some(list) = values.as_array_mut() {
            list.push(value);
        }
    }
    serde_json::Value::Array(
        subjects
            .into_values()
            .map(serde_json::Value::Object)
            .collect(),
    )
}

/// Frictionless Data type of an Arrow type name.
fn frictionless_type(arrow: &str) -> &'static str {
    match arrow {
        t if t.starts_with("Int") || t.starts_with("UInt") => "integer",
        t if t.starts_with("Decimal") || t.starts_with("Float") => "number",
        "Date32" | "Date64" => "date",
        t if t.starts_with("Timestamp") => "datetime",
        "Boolean" => "boolean",
        _ => "string",
    }
}

/// The dataset's Frictionless `datapackage.json`.
pub fn data_package(base: &str, meta: &DatasetMeta) -> serde_json::Value {
    let fields: Vec<serde_json::Value> = meta
        .columns
        .iter()
        .map(|(name, ty)| serde_json::json!({ "name": name, "type": frictionless_type(ty) }))
        .collect();
    let mut schema = serde_json::json!({ "fields": fields });
    if !meta.primary_key.is_empty() {
        schema["primaryKey"] = serde_json::json!(meta.primary_key);
    }
    let resources: Vec<serde_json::Value> = meta
        .files
        .iter()
        .flat_map(|(partition, files)| {
            let schema = &schema;
            files.iter().map(move |(format, (_, bytes))| {
                serde_json::json!({
                    "name": format!("{}-{}-{}", meta.id, partition, format.extension()).to_lowercase(),
                    "path": format!("latest/{partition}.{}", format.extension()),
                    "format": format.extension(),
                    "mediatype": media_type(*format),
                    "bytes": bytes,
                    "schema": schema,
                })
            })
        })
        .collect();
    serde_json::json!({
        "name": meta.id,
        "title": meta.title,
        "description": meta.description,
        "homepage": format!("{}/{}", base.trim_end_matches('/'), segment(&meta.id)),
        "licenses": [{ "name": meta.license, "path": licence_iri(&meta.license) }],
        "contributors": [{ "title": meta.publisher, "email": meta.contact, "role": "publisher" }],
        "keywords": meta.keywords,
        "resources": resources,
    })
}

/// Updates a dataset's description from its newest version.
pub fn refresh(
    meta: &mut DatasetMeta,
    version: &Version,
    temporal: Option<(NaiveDate, NaiveDate)>,
) {
    meta.issued = meta.issued.or(Some(version.created));
    meta.modified = Some(version.created);
    meta.temporal = temporal;
    meta.rows = version.rows;
    meta.columns = version
        .schema
        .iter()
        .map(|c| (c.name.clone(), c.type_.clone()))
        .collect();
    meta.files = version
        .partitions
        .iter()
        .map(|(p, files)| {
            (
                p.clone(),
                files
                    .files
                    .iter()
                    .map(|(f, r)| (*f, (r.path.clone(), r.bytes)))
                    .collect(),
            )
        })
        .collect();
}

/// Writes a dataset's `dataset.json` and `datapackage.json`, then rebuilds the
/// store's catalog from every dataset's description.
pub async fn publish(store: &Store, base: &str, meta: &DatasetMeta) -> object_store::Result<()> {
    // Pipelines in one process rebuild the catalog one at a time, each after
    // writing its own description, so the last to rebuild sees every dataset.
    static CATALOG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let json =
        |v: &serde_json::Value| Bytes::from(serde_json::to_vec_pretty(v).unwrap_or_default());
    let described = serde_json::to_value(meta).unwrap_or_default();
    // Independent writes and reads go out together: on a remote store each is
    // a round trip.
    let (described_at, package_at) = (
        format!("{}/dataset.json", meta.id),
        format!("{}/datapackage.json", meta.id),
    );
    futures::try_join!(
        store.put(&described_at, json(&described)),
        store.put(&package_at, json(&data_package(base, meta))),
    )?;
    let _one_at_a_time = CATALOG.lock().await;
    // This dataset's description is the one in hand; the others are read.
    let paths: Vec<String> = store
        .list_dirs()
        .await?
        .into_iter()
        .filter(|dir| *dir != meta.id)
        .map(|dir| format!("{dir}/dataset.json"))
        .collect();
    let reads: Vec<_> = paths.iter().map(|path| store.get(path)).collect();
    let mut datasets: Vec<DatasetMeta> = futures::stream::iter(reads)
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .flatten()
        .filter_map(|bytes| serde_json::from_slice::<DatasetMeta>(&bytes).ok())
        .collect();
    datasets.push(meta.clone());
    datasets.sort_by(|a, b| a.id.cmp(&b.id));
    let rdf = rdf_xml(base, &datasets).map_err(|e| object_store::Error::Generic {
        store: "catalog",
        source: Box::new(e),
    })?;
    futures::try_join!(
        store.put("catalog.rdf", Bytes::from(rdf)),
        store.put("catalog.jsonld", json(&json_ld(base, &datasets))),
    )?;
    Ok(())
}
