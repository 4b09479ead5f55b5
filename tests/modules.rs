//! The actors crate reads bottom-up (`actors/src/lib.rs` lists its layers): no module
//! depends, through any chain of others, on itself. This test draws the graph of the
//! crate's top-level modules from every `crate::…` path in their code (comments left
//! out) and fails, naming the circle, when one appears.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module -> the top-level modules its code names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// `actors/src/store/mongo.rs` -> `store`; `lib.rs` has no module.
fn module_of(root: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "lib").then(|| name.to_owned())
}

fn graph(root: &Path) -> Graph {
    let mut files = Vec::new();
    sources(root, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(root, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let named = graph.entry(module.clone()).or_default();
        for line in text.lines().map(str::trim_start) {
            if line.starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let rest = &line[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `crate::{a, b}` and a path that ends here name no module of this kind.
                if !name.is_empty() && name != module {
                    named.insert(name);
                }
            }
        }
    }
    // Only edges between the crate's own modules.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for named in graph.values_mut() {
        named.retain(|m| modules.contains(m));
    }
    graph
}

/// A circle of modules, if the graph has one.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        module: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(module) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|m| m == module).unwrap();
                let mut circle = path[start..].to_vec();
                circle.push(module.to_owned());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(module.to_owned(), Mark::Open);
        path.push(module.to_owned());
        for next in &graph[module] {
            if let Some(circle) = visit(graph, next, marks, path) {
                return Some(circle);
            }
        }
        path.pop();
        marks.insert(module.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut marks, &mut Vec::new()))
}

#[test]
fn no_module_of_the_actors_crate_depends_on_itself() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("actors/src");
    let graph = graph(&root);
    assert!(graph.len() > 20, "the crate's modules were read: {graph:?}");
    assert!(graph["session"].contains("registry"), "edges were read");
    if let Some(circle) = circle(&graph) {
        panic!("a circle of modules: {}", circle.join(" -> "));
    }
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        graph.entry(from.into()).or_default().insert(to.into());
        graph.entry(to.into()).or_default();
    }
    let found = circle(&graph).unwrap();
    assert_eq!(found.first(), found.last());
    assert_eq!(found.len(), 4, "{found:?}");
    graph.get_mut("c").unwrap().clear();
    assert_eq!(circle(&graph), None);
}
