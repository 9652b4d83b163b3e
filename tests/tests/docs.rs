//! The documentation names only what exists: every relative link reaches a
//! file (and a heading, for `#anchor`), every repository path written in
//! backticks is a file or directory, and every test named as `file.rs`:
//! `test_name` is a function of that file.
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_path_buf()
}

fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    docs.extend(pages);
    docs
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_`
/// dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `[label](target)` links outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_link_reaches_a_file_and_a_heading() {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() { doc.clone() } else { doc.parent().expect("a directory").join(path) };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", doc.display()));
                continue;
            }
            if !anchor.is_empty() {
                let there = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&there).iter().any(|a| a == anchor) {
                    broken.push(format!("{}: {target}: no such heading", doc.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Backticked words that are paths in this repository: a known top-level
/// directory, then more, no placeholders.
fn repo_paths(text: &str) -> Vec<String> {
    const TOP: [&str; 9] =
        ["mesh-agent/", "mesh-ebpf/", "mesh-common/", "tests/", "xtask/", "deploy/", "docs/", "examples/", ".ci/"];
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| TOP.iter().any(|t| w.starts_with(t)))
        .filter(|w| !w.contains(|c: char| c.is_whitespace() || "<>*{}…$".contains(c)))
        .map(|w| w.trim_end_matches(['/', ':', ',']).to_owned())
        .collect()
}

#[test]
fn every_repository_path_named_exists() {
    let root = root();
    let mut missing = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        for path in repo_paths(&text) {
            // `file.rs::item` names an item of the file.
            let file = path.split("::").next().unwrap_or(&path);
            if !root.join(file).exists() {
                missing.push(format!("{}: `{path}`", doc.display()));
            }
        }
    }
    assert!(missing.is_empty(), "paths that do not exist:\n{}", missing.join("\n"));
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target" && n != "fuzz") {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_test_named_is_a_function_of_its_file() {
    let root = root();
    let mut sources = Vec::new();
    for dir in ["tests", "mesh-agent"] {
        rust_files(&root.join(dir), &mut sources);
    }
    let mut missing = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("readable");
        let words: Vec<&str> = text.split('`').collect();
        // `file.rs`: `name` or `file.rs` `name`: a backticked file, then a
        // backticked identifier after nothing but `: ` or a space.
        for i in (1..words.len().saturating_sub(2)).step_by(2) {
            let (file, between, name) = (words[i], words[i + 1], words[i + 2]);
            let is_name =
                name.len() > 3 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !file.ends_with(".rs") || !matches!(between, ": " | " ") || !is_name || !name.contains('_') {
                continue;
            }
            let file_name = file.rsplit('/').next().unwrap_or(file);
            let found = sources
                .iter()
                .filter(|p| p.file_name().is_some_and(|n| n == file_name))
                .any(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains(&format!("fn {name}("))));
            if !found {
                missing.push(format!("{}: `{file}` `{name}`", doc.display()));
            }
        }
    }
    assert!(missing.is_empty(), "tests named that do not exist:\n{}", missing.join("\n"));
}
