//! The DCAT-AP-SE catalog, parsed with a real RDF/XML parser, has every mandatory
//! and recommended property; every dataset has a datapackage.json.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use oxrdf::{NamedOrBlankNode, Term};

const DCAT: &str = "http://www.w3.org/ns/dcat#";
const DCT: &str = "http://purl.org/dc/terms/";
const RDF_TYPE: &str = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type";

/// subject → predicate → objects
type Graph = BTreeMap<String, BTreeMap<String, Vec<Term>>>;

fn parse(rdf: &[u8]) -> Graph {
    let mut graph = Graph::new();
    for triple in oxrdfxml::RdfXmlParser::new().for_slice(rdf) {
        let triple = triple.unwrap();
        let subject = match &triple.subject {
            NamedOrBlankNode::NamedNode(n) => n.as_str().to_string(),
            NamedOrBlankNode::BlankNode(b) => format!("_:{}", b.as_str()),
        };
        graph
            .entry(subject)
            .or_default()
            .entry(triple.predicate.as_str().to_string())
            .or_default()
            .push(triple.object);
    }
    graph
}

fn of_type<'a>(
    graph: &'a Graph,
    class: &str,
) -> Vec<(&'a String, &'a BTreeMap<String, Vec<Term>>)> {
    graph
        .iter()
        .filter(|(_, p)| {
            p.get(RDF_TYPE).is_some_and(|t| {
                t.iter()
                    .any(|t| matches!(t, Term::NamedNode(n) if n.as_str() == class))
            })
        })
        .collect()
}

fn iris(props: &BTreeMap<String, Vec<Term>>, predicate: &str) -> Vec<String> {
    props
        .get(predicate)
        .into_iter()
        .flatten()
        .filter_map(|t| match t {
            Term::NamedNode(n) => Some(n.as_str().to_string()),
            _ => None,
        })
        .collect()
}

fn has_sv_literal(props: &BTreeMap<String, Vec<Term>>, predicate: &str) -> bool {
    props
        .get(predicate)
        .into_iter()
        .flatten()
        .any(|t| matches!(t, Term::Literal(l) if l.language() == Some("sv")))
}

#[test]
fn the_catalog_describes_every_dataset_per_dcat_ap_se() {
    let (_dir, demo) = support::demo_once();
    let store = demo.join("published");
    let graph = parse(&std::fs::read(store.join("catalog.rdf")).unwrap());

    // Absolute IRIs only; the only blank nodes are periods of time.
    for (subject, props) in &graph {
        if subject.starts_with("_:") {
            assert_eq!(
                iris(props, RDF_TYPE),
                vec![format!("{DCT}PeriodOfTime")],
                "{subject}"
            );
        }
        for objects in props.values() {
            for o in objects {
                if let Term::NamedNode(n) = o {
                    assert!(
                        n.as_str().contains("://") || n.as_str().starts_with("mailto:"),
                        "{n}"
                    );
                }
            }
        }
    }

    let catalogs = of_type(&graph, &format!("{DCAT}Catalog"));
    assert_eq!(catalogs.len(), 1);
    let (_, catalog) = catalogs[0];
    assert!(has_sv_literal(catalog, &format!("{DCT}title")));
    assert!(has_sv_literal(catalog, &format!("{DCT}description")));
    assert_eq!(
        iris(catalog, &format!("{DCT}publisher")),
        vec!["http://dataportal.se/organisation/SE2120000000"]
    );
    assert_eq!(
        iris(catalog, &format!("{DCT}license")),
        vec!["http://creativecommons.org/publicdomain/zero/1.0/"]
    );
    let listed: BTreeSet<String> = iris(catalog, &format!("{DCAT}dataset"))
        .into_iter()
        .collect();

    let datasets = of_type(&graph, &format!("{DCAT}Dataset"));
    assert_eq!(datasets.len(), 3);
    for (iri, d) in &datasets {
        assert!(listed.contains(*iri), "{iri} not in the catalog");
        for p in ["title", "description"] {
            assert!(has_sv_literal(d, &format!("{DCT}{p}")), "{iri}: {p}");
        }
        for p in [
            format!("{DCT}publisher"),
            format!("{DCAT}contactPoint"),
            format!("{DCT}accessRights"),
            format!("{DCT}accrualPeriodicity"),
            format!("{DCAT}theme"),
            format!("{DCAT}distribution"),
        ] {
            assert!(!iris(d, &p).is_empty(), "{iri}: {p}");
        }
        assert!(
            has_sv_literal(d, &format!("{DCAT}keyword")),
            "{iri}: keyword"
        );
        assert_eq!(
            iris(d, &format!("{DCT}accessRights")),
            vec!["http://publications.europa.eu/resource/authority/access-right/PUBLIC"]
        );
        assert!(
            iris(d, &format!("{DCT}accrualPeriodicity"))[0]
                .starts_with("http://publications.europa.eu/resource/authority/frequency/")
        );
        for p in ["issued", "modified"] {
            assert!(d.contains_key(&format!("{DCT}{p}")), "{iri}: {p}");
        }
        let contact = &graph[&iris(d, &format!("{DCAT}contactPoint"))[0]];
        assert_eq!(
            iris(contact, "http://www.w3.org/2006/vcard/ns#hasEmail"),
            vec!["mailto:oppnadata@exempel.se"]
        );
        let publisher = &graph[&iris(d, &format!("{DCT}publisher"))[0]];
        assert_eq!(
            iris(publisher, &format!("{DCT}type")),
            vec!["http://purl.org/adms/publishertype/LocalAuthority"]
        );
        assert!(publisher.contains_key("http://xmlns.com/foaf/0.1/name"));

        let mut formats = BTreeSet::new();
        for dist_iri in iris(d, &format!("{DCAT}distribution")) {
            let dist = &graph[&dist_iri];
            assert_eq!(
                iris(dist, &format!("{DCAT}accessURL")).len(),
                1,
                "{dist_iri}"
            );
            let downloads = iris(dist, &format!("{DCAT}downloadURL"));
            assert!(!downloads.is_empty(), "{dist_iri}");
            for url in &downloads {
                // The download URL is the latest/ file, and it exists in the store.
                let relative = url
                    .strip_prefix(&format!("file://{}/", store.display()))
                    .unwrap();
                assert!(relative.contains("/latest/"), "{url}");
                assert!(store.join(relative).exists(), "{url}");
            }
            formats.extend(iris(dist, &format!("{DCT}format")));
            assert_eq!(
                iris(dist, &format!("{DCT}license")),
                vec!["http://creativecommons.org/publicdomain/zero/1.0/"]
            );
            assert!(dist.contains_key(&format!("{DCAT}byteSize")));
            assert!(has_sv_literal(dist, &format!("{DCT}title")));
        }
        assert_eq!(
            formats,
            BTreeSet::from([
                "http://publications.europa.eu/resource/authority/file-type/CSV".to_string(),
                "http://publications.europa.eu/resource/authority/file-type/PARQUET".to_string()
            ])
        );
    }
    // Supplier invoices: the spec it conforms to, and temporal coverage from the data.
    let (_, invoices) = datasets
        .iter()
        .find(|(iri, _)| iri.ends_with("/leverantorsfakturor"))
        .unwrap();
    assert_eq!(
        iris(invoices, &format!("{DCT}conformsTo")),
        vec!["https://lankadedata.se/spec/leverantorsreskontra/"]
    );
    let period = match &invoices[&format!("{DCT}temporal")][0] {
        Term::BlankNode(b) => &graph[&format!("_:{}", b.as_str())],
        other => panic!("{other}"),
    };
    let start = match &period[&format!("{DCAT}startDate")][0] {
        Term::Literal(l) => l.value().to_string(),
        other => panic!("{other}"),
    };
    assert!(start.starts_with("2025-01"), "{start}");

    // JSON-LD holds the same datasets; each dataset has a datapackage.json.
    let jsonld: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("catalog.jsonld")).unwrap()).unwrap();
    let typed_datasets = jsonld
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["@type"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == &format!("{DCAT}Dataset")))
        })
        .count();
    assert_eq!(typed_datasets, 3);
    let package: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("leverantorsfakturor/datapackage.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        package["licenses"][0]["path"],
        "http://creativecommons.org/publicdomain/zero/1.0/"
    );
    let resource = &package["resources"][0];
    assert_eq!(
        resource["schema"]["primaryKey"],
        serde_json::json!(["verifikationsnummer"])
    );
    let fields = resource["schema"]["fields"].as_array().unwrap();
    let belopp = fields.iter().find(|f| f["name"] == "belopp").unwrap();
    assert_eq!(belopp["type"], "number");
    assert!(
        store
            .join("leverantorsfakturor")
            .join(resource["path"].as_str().unwrap())
            .exists()
    );
}
