//! The layering ARCHITECTURE.md describes, checked on the source: each
//! top-level module imports (`crate::<module>`) only the modules its row
//! allows, so the model stays at the bottom and the top-level modules have no
//! import cycle. Test modules (`tests.rs`, files under a `tests/` directory,
//! `#[cfg(test)] mod … { }`) may reach
//! further (a test builds its state from YAML).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Each top-level module and what it may import.
const ALLOWED: &[(&str, &[&str])] = &[
    ("state", &[]),
    ("marks", &[]),
    ("routing", &["state"]),
    ("identity", &["state", "marks"]),
    ("telemetry", &["state"]),
    ("config", &["state", "routing", "identity"]),
    ("capture", &["state", "marks"]),
    ("privileges", &[]),
    ("dns", &["state", "telemetry", "marks"]),
    ("proxy", &["state", "routing", "identity", "telemetry", "capture", "marks", "dns"]),
    ("discovery", &["state", "identity", "config", "telemetry"]),
    (
        "agent",
        &["state", "routing", "identity", "telemetry", "config", "capture", "proxy", "discovery", "dns", "marks"],
    ),
    ("ca_server", &["state", "identity", "config", "telemetry", "discovery"]),
    ("controller", &["config", "discovery"]),
    (
        "cli",
        &[
            "state",
            "routing",
            "identity",
            "telemetry",
            "config",
            "capture",
            "proxy",
            "discovery",
            "dns",
            "agent",
            "ca_server",
            "controller",
            "privileges",
            "marks",
        ],
    ),
];

#[test]
fn top_level_modules_import_only_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel.iter().next().and_then(|c| c.to_str()).expect("a path").trim_end_matches(".rs").to_owned();
        let test_module = rel.file_name().is_some_and(|n| n == "tests.rs") || rel.iter().any(|c| c == "tests");
        if matches!(top.as_str(), "lib" | "main") || test_module {
            continue;
        }
        let text = without_tests(&without_comments(&std::fs::read_to_string(&file).expect("readable source")));
        for target in imported_modules(&text) {
            if target != top && allowed.contains_key(target.as_str()) {
                found.entry(top.clone()).or_default().insert(format!("{target} ({})", rel.display()));
            }
        }
    }
    let mut wrong = Vec::new();
    for (module, imports) in &found {
        let Some(ok) = allowed.get(module.as_str()) else {
            wrong.push(format!("{module}: a top-level module missing from ALLOWED (and ARCHITECTURE.md)"));
            continue;
        };
        for i in imports {
            let target = i.split(' ').next().unwrap_or_default();
            if !ok.contains(&target) {
                wrong.push(format!("{module} imports {i}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn without_comments(text: &str) -> String {
    text.lines().map(|l| l.split_once("//").map_or(l, |(code, _)| code)).collect::<Vec<_>>().join("\n")
}

/// Drops `#[cfg(test)] mod name { … }` blocks.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find(['{', ';']) else { break };
        if after.as_bytes()[open] == b';' || !after[..open].contains("mod ") {
            out.push_str(&after[..open + 1]);
            rest = &after[open + 1..];
            continue;
        }
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The first path segment after each `crate::`, including each item of a
/// `crate::{a::…, b, …}` group.
fn imported_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        out.push(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// How the files under `src/<module>/` name things: for each child module
/// (its `.rs` files and directories), the other children it names by path —
/// `super::x` from a child file, `super::super::x` from a grandchild,
/// `crate::<module>::x` or `<module>::x` from anywhere inside (tests
/// excluded) — and every name it takes from the module's own file that is
/// not a child: a function, constant or static when it starts lowercase.
struct Naming {
    edges: BTreeMap<String, BTreeSet<String>>,
    /// `(file, name)`: a lowercase name of the parent's own file, used by a child.
    upward: Vec<(String, String)>,
    /// Files that glob-import their parent (`use super::*`), which hides what they name.
    globs: Vec<String>,
}

fn naming(module: &str) -> Naming {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = src.join(module);
    let children: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("the module's directory")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some(name.strip_suffix(".rs").map_or(name.clone(), str::to_owned)).filter(|n| n != "tests")
        })
        .collect();
    let path = module.replace('/', "::");
    let last = module.rsplit('/').next().expect("a name");
    let mut found = Naming { edges: BTreeMap::new(), upward: Vec::new(), globs: Vec::new() };
    for file in rust_files(&dir) {
        let rel = file.strip_prefix(&dir).expect("under the module");
        let test_module = rel.file_name().is_some_and(|n| n == "tests.rs") || rel.iter().any(|c| c == "tests");
        if test_module {
            continue;
        }
        let child = rel.iter().next().and_then(|c| c.to_str()).expect("a path").trim_end_matches(".rs").to_owned();
        let depth = rel.components().count();
        let text = without_tests(&without_comments(&std::fs::read_to_string(&file).expect("readable source")));
        if depth == 1 && text.contains("use super::*") {
            found.globs.push(rel.display().to_string());
        }
        // Rewrite each way of naming the parent module as `crate::`, then
        // reuse the crate-level parser.
        let mut text = text.replace(&format!("crate::{path}::"), "\u{2}").replace("crate::", "\u{1}");
        text = by_bare_name(&text, last);
        match depth {
            1 => text = text.replace("super::", "crate::"),
            2 => text = text.replace("super::super::", "crate::"),
            _ => {}
        }
        let text = text.replace('\u{2}', "crate::");
        for target in imported_modules(&text) {
            if target == child || target == "self" {
                continue;
            }
            if children.contains(&target) {
                found.edges.entry(child.clone()).or_default().insert(target);
            } else if target.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.upward.push((rel.display().to_string(), target));
            }
        }
    }
    found
}

/// `name::` where `name` stands alone (not `x::name::` or `x_name::`): the
/// module imported by its own name (`use crate::proxy; … proxy::x`).
fn by_bare_name(text: &str, name: &str) -> String {
    let pattern = format!("{name}::");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&pattern) {
        let before = rest[..at].chars().next_back();
        let alone = !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        out.push_str(&rest[..at]);
        out.push_str(if alone { "\u{2}" } else { &pattern });
        rest = &rest[at + pattern.len()..];
    }
    out.push_str(rest);
    out
}

/// Every directory under `src/<top>/`, as a module path (`proxy/inbound`).
fn modules_under(top: &str) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = vec![top.to_owned()];
    let mut i = 0;
    while i < out.len() {
        for entry in std::fs::read_dir(src.join(&out[i])).expect("readable").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && name != "tests" {
                out.push(format!("{}/{name}", out[i]));
            }
        }
        i += 1;
    }
    out
}

/// A cycle in `edges`, if there is one, as the modules along it.
fn a_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

/// Inside `config/`, `routing/` and `proxy/` too, and inside each of their
/// directories (`proxy/inbound/`, `proxy/outbound/http/`, …), the child
/// modules import each other without a circle (what every kind shares is a
/// leaf: `config/object.rs`, `routing/request.rs`; the destination side
/// reaches the outbound direction only through `Inputs::dial`).
#[test]
fn the_child_modules_of_config_routing_and_proxy_have_no_import_circle() {
    for module in ["config", "routing", "proxy"].into_iter().flat_map(modules_under) {
        let edges = naming(&module).edges;
        if let Some(cycle) = a_cycle(&edges) {
            panic!("{module}/ has an import circle: {}\n(imports: {edges:?})", cycle.join(" → "));
        }
    }
}

/// `proxy.rs` declares the data path's modules, holds the error type and
/// runs the capture listeners; its children call none of its functions (the
/// shared L4 tools are `proxy/l4.rs`), and none glob-imports it. So too for
/// each direction: the door is `inbound/admit.rs`, opening an upstream
/// `outbound/open.rs`, each a sibling the others call, never the parent.
#[test]
fn the_proxy_modules_children_call_nothing_of_it() {
    for module in ["proxy", "proxy/inbound", "proxy/outbound"] {
        let found = naming(module);
        assert!(found.upward.is_empty(), "children of {module}/ naming functions of {module}.rs: {:?}", found.upward);
        assert!(found.globs.is_empty(), "children of {module}/ glob-importing {module}.rs: {:?}", found.globs);
    }
    // The directions: the destination side never names the outbound one.
    let edges = naming("proxy").edges;
    let inbound = edges.get("inbound").cloned().unwrap_or_default();
    assert!(!inbound.contains("outbound"), "inbound/ imports outbound/: {inbound:?}");
    for shared in ["l4", "http", "upstream", "hbone", "conns"] {
        let names = edges.get(shared).cloned().unwrap_or_default();
        assert!(
            !names.contains("inbound") && !names.contains("outbound") && !names.contains("gateway"),
            "{shared} is shared by the directions, yet imports {names:?}"
        );
    }
}
