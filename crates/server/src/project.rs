//! Reading a project folder from disk, and writing the example one.

use std::path::Path;

use anyhow::Context;
use kappa_pipeline::{PROJECT_FILE, ProjectFiles};

/// The files of a project folder that make up the project: `kappa.toml`, `topics/*.toml`,
/// `models/*/*.{sql,toml}`. Other files are not read.
pub fn read_files(dir: &Path) -> anyhow::Result<ProjectFiles> {
    let mut files = ProjectFiles::new();
    let mut add = |relative: String| -> anyhow::Result<()> {
        let path = dir.join(&relative);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        files.insert(relative, text);
        Ok(())
    };
    if dir.join(PROJECT_FILE).is_file() {
        add(PROJECT_FILE.to_owned())?;
    }
    for name in names_in(&dir.join("topics"))? {
        if name.ends_with(".toml") {
            add(format!("topics/{name}"))?;
        }
    }
    for layer in names_in(&dir.join("models"))? {
        if !dir.join("models").join(&layer).is_dir() {
            continue;
        }
        for name in names_in(&dir.join("models").join(&layer))? {
            if name.ends_with(".sql") || name.ends_with(".toml") {
                add(format!("models/{layer}/{name}"))?;
            }
        }
    }
    Ok(files)
}

/// Reads and validates the project in `dir`: its structure (kappa-pipeline), then every model
/// planned against the schemas it reads (kappa-engine). All problems, or the project.
pub async fn check(
    dir: &Path,
) -> anyhow::Result<Result<kappa_pipeline::Project, Vec<kappa_pipeline::Diagnostic>>> {
    Ok(check_files(&read_files(dir)?).await)
}

/// [`check`] of a project's files already read.
pub async fn check_files(
    files: &ProjectFiles,
) -> Result<kappa_pipeline::Project, Vec<kappa_pipeline::Diagnostic>> {
    let project = match kappa_pipeline::load(files) {
        Ok(project) => project,
        Err(diagnostics) => return Err(diagnostics),
    };
    // Every path that runs models reads the project here: `hash` takes its key from the
    // variable this project names.
    kappa_engine::mask::read_hash_key_from(project.config.masking.secret_env());
    let diagnostics = kappa_engine::check::check(&project).await;
    if diagnostics.is_empty() {
        Ok(project)
    } else {
        Err(diagnostics)
    }
}

/// Says (as a warning) when the folder `dir` holds something other than what is deployed
/// (`deployed`, from `files`): `kappa up` serves what is deployed, and the folder's changes
/// wait for `kappa deploy`.
pub async fn warn_if_not_deployed(
    dir: &Path,
    deployed: &kappa_pipeline::Project,
    files: &ProjectFiles,
) {
    let folder = match read_files(dir) {
        Ok(folder) => folder,
        Err(e) => {
            tracing::warn!(folder = %dir.display(), error = %format!("{e:#}"), "the project folder cannot be read; serving what is deployed");
            return;
        }
    };
    if &folder == files {
        return;
    }
    match check_files(&folder).await {
        Err(diagnostics) => {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            tracing::warn!(folder = %dir.display(), "the project folder has problems; serving what is deployed until a deploy of a folder that checks clean:\n{}", lines.join("\n"));
        }
        Ok(project) => {
            let record = kappa_pipeline::deploy::Deployment::of(deployed, files);
            let changed: Vec<String> = kappa_pipeline::deploy::plan(&project, &record)
                .into_iter()
                .filter(|p| p.change != kappa_pipeline::deploy::Change::Unchanged)
                .map(|p| p.model)
                .collect();
            if !changed.is_empty() {
                tracing::warn!(folder = %dir.display(), models = ?changed, "the project folder differs from what is deployed; serving what is deployed (`kappa plan` shows the difference, `kappa deploy` applies it)");
            }
        }
    }
    // The folder's check read its hash key; what runs is the deployed project.
    kappa_engine::mask::read_hash_key_from(deployed.config.masking.secret_env());
}

/// Puts the project file `relative` (`models/gold/revenue.sql`) of the folder `dir` back to
/// `text`, or removes it when `text` is `None`; durable when this returns.
pub fn restore_file(dir: &Path, relative: &str, text: Option<&str>) -> anyhow::Result<()> {
    let path = dir.join(relative);
    match text {
        Some(text) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
            crate::deployment::replace_file(&path, text.as_bytes())
                .with_context(|| format!("write {}", path.display()))
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => {
                let parent = path.parent().unwrap_or(dir);
                std::fs::File::open(parent)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("sync {}", parent.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        },
    }
}

/// Entry names of a directory, sorted; none when it does not exist.
fn names_in(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Writes the example project into `dir` (created if needed). Refuses to touch a folder that
/// already holds a `kappa.toml`, and never overwrites a file.
pub fn scaffold(dir: &Path) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        !dir.join(PROJECT_FILE).exists(),
        "{} already holds a kappa project ({PROJECT_FILE} exists)",
        dir.display()
    );
    for (relative, _) in kappa_pipeline::scaffold::FILES {
        let path = dir.join(relative);
        anyhow::ensure!(
            !path.exists(),
            "{} exists; kappa init writes only new files",
            path.display()
        );
    }
    let mut written = Vec::new();
    for (relative, contents) in kappa_pipeline::scaffold::FILES {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        written.push((*relative).to_owned());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaffold_reads_back_as_a_clean_project() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shop");
        let written = scaffold(&target).unwrap();
        assert!(written.contains(&"topics/orders.toml".to_owned()));
        let files = read_files(&target).unwrap();
        assert!(
            !files.contains_key("data/orders.ndjson"),
            "only project files are read"
        );
        let project = kappa_pipeline::load(&files).unwrap();
        assert_eq!(project.models.len(), 3);
        let again = scaffold(&target).unwrap_err().to_string();
        assert!(again.contains("already holds a kappa project"), "{again}");
    }
}
