//! What is deployed, kept in the data directory (`deployment.json`): the versions `kappa up`
//! runs, which `kappa plan` compares the project folder with.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use kappa_pipeline::deploy::Deployment;

/// The file in the data directory.
pub const DEPLOYMENT_FILE: &str = "deployment.json";

/// The file in the data directory naming the deploy in progress (its project), so that a
/// restart carries it on: `kappa up` serves what is deployed and changes it only through a
/// deploy, never by reading the folder again.
pub const TARGET_FILE: &str = "deploying.json";

/// The deployment recorded in `data_dir`, if any.
pub fn load(data_dir: &Path) -> anyhow::Result<Option<Deployment>> {
    load_file(&data_dir.join(DEPLOYMENT_FILE))
}

/// The deploy in progress recorded in `data_dir`, if one is.
pub fn load_target(data_dir: &Path) -> anyhow::Result<Option<Deployment>> {
    load_file(&data_dir.join(TARGET_FILE))
}

/// Records `target` as the deploy in progress in `data_dir`, or that none is (`None`).
pub fn save_target(data_dir: &Path, target: Option<&Deployment>) -> anyhow::Result<()> {
    let path = data_dir.join(TARGET_FILE);
    match target {
        Some(target) => {
            let text = serde_json::to_vec_pretty(target).context("serialize the deploy")?;
            replace_file(&path, &text).with_context(|| format!("write {}", path.display()))
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        },
    }
}

fn load_file(path: &Path) -> anyhow::Result<Option<Deployment>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{}: not a deployment", path.display()))
}

/// Records `deployment` in `data_dir`: written aside, synced, then renamed over the old one,
/// so that a crash leaves the old deployment or the new one, never a mix.
pub fn save(data_dir: &Path, deployment: &Deployment) -> anyhow::Result<()> {
    let path = data_dir.join(DEPLOYMENT_FILE);
    let text = serde_json::to_vec_pretty(deployment).context("serialize the deployment")?;
    replace_file(&path, &text).with_context(|| format!("write {}", path.display()))
}

/// Replaces `path` by `bytes` so that a crash leaves the old file or the new one: written
/// aside, fsynced, renamed over it, and the rename fsynced in the folder.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut aside = path.as_os_str().to_owned();
    aside.push(".new");
    let mut file = std::fs::File::create(&aside)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)?;
    std::fs::File::open(folder)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_deployment_reads_back_and_none_is_none() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert_eq!(load(dir.path()).expect("no file is no deployment"), None);
        let mut files = kappa_pipeline::ProjectFiles::new();
        files.insert("kappa.toml".into(), String::new());
        files.insert(
            "topics/orders.toml".into(),
            "[schema]\nid = \"bigint\"\n".into(),
        );
        files.insert(
            "models/silver/ids.sql".into(),
            "SELECT id FROM orders".into(),
        );
        let project = kappa_pipeline::load(&files).expect("a valid project");
        let deployment = Deployment::of(&project, &files);
        assert_eq!(deployment.project(), Some(project));
        save(dir.path(), &deployment).expect("saved");
        assert_eq!(load(dir.path()).expect("read back"), Some(deployment));
        std::fs::write(dir.path().join(DEPLOYMENT_FILE), "{").expect("overwritten");
        let error = load(dir.path())
            .expect_err("a broken file is an error")
            .to_string();
        assert!(
            error.contains("deployment.json: not a deployment"),
            "{error}"
        );
    }

    #[test]
    fn a_rollbacks_undo_travels_with_the_deploy_in_progress_and_old_records_still_read() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut target = Deployment::default();
        target.undo.push(kappa_pipeline::deploy::FolderFile {
            folder: "/srv/shop".into(),
            path: "models/silver/orders.sql".into(),
            text: Some("SELECT 1\n".into()),
        });
        save_target(dir.path(), Some(&target)).expect("saved");
        assert_eq!(load_target(dir.path()).expect("read back"), Some(target));
        // A record written before undo existed still reads, with nothing to put back.
        std::fs::write(
            dir.path().join(DEPLOYMENT_FILE),
            r#"{"models":{},"topics":{}}"#,
        )
        .expect("written");
        let old = load(dir.path()).expect("an old record").expect("one");
        assert!(old.undo.is_empty());
    }
}
