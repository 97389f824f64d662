//! The enclave image's two ramdisks without Docker or nitro-cli, in the layout
//! `nitro-cli build-enclave` produces (aws-nitro-enclaves-cli, `enclave_build`): a bootstrap
//! ramdisk with the init and the kernel modules, and a customer ramdisk with `rootfs/` (here:
//! the static `enclave` binary and the guardrail policy), `cmd` and `env`. `eif_build` then
//! puts them in an EIF beside the kernel.
//!
//! Deterministic: entries in a fixed order, inode numbers counted from 1, owner 0, mtime 0,
//! modes fixed here, so two builds from the same inputs give the same bytes and the same
//! PCR0/2. The command and environment come from `enclave/Dockerfile` (its `ENTRYPOINT` and
//! `ENV` lines), the one place they are declared for the Docker build too.

use cpio::newc::{Builder, ModeFileType};
use std::io::Write;

/// Errors building a ramdisk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Dockerfile has no `ENTRYPOINT ["…", …]` line, or an `ENV` line this reader cannot
    /// take (only `ENV NAME=value` on one line).
    #[error("Dockerfile: {0}")]
    Dockerfile(String),
    /// A file does not fit a cpio entry (4 GiB).
    #[error("{0} is too large for a cpio entry")]
    TooLarge(String),
    /// Writing the archive failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One entry of a ramdisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory, mode 0755.
    Dir(String),
    /// A regular file with its permission bits.
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A character device (`dev/console` before devtmpfs is mounted).
    Char {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// `entries` as a newc cpio archive (the format the kernel unpacks as an initramfs).
pub fn cpio(entries: &[Entry]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let (b, data): (Builder, &[u8]) = match e {
            Entry::Dir(path) => (
                Builder::new(path)
                    .mode(0o755)
                    .nlink(2)
                    .set_mode_file_type(ModeFileType::Directory),
                &[],
            ),
            Entry::File { path, mode, data } => (
                Builder::new(path)
                    .mode(*mode)
                    .set_mode_file_type(ModeFileType::Regular),
                data,
            ),
            Entry::Char {
                path,
                mode,
                major,
                minor,
            } => (
                Builder::new(path)
                    .mode(*mode)
                    .rdev_major(*major)
                    .rdev_minor(*minor)
                    .set_mode_file_type(ModeFileType::Char),
                &[],
            ),
        };
        let size = u32::try_from(data.len()).map_err(|_| Error::TooLarge(name(e).to_string()))?;
        let mut w = b.ino(ino).uid(0).gid(0).mtime(0).write(&mut out, size);
        w.write_all(data)?;
        w.finish()?;
    }
    cpio::newc::trailer(&mut out)?;
    Ok(out)
}

fn name(e: &Entry) -> &str {
    match e {
        Entry::Dir(p) | Entry::File { path: p, .. } | Entry::Char { path: p, .. } => p,
    }
}

/// The bootstrap ramdisk: `init`, `dev/console`, the kernel modules as `modules/NAME.ko` and
/// their load order in `modules/order` (`modules` is in load order, dependencies first: the
/// init loads exactly these, in this order; the kernel the image carries decides which).
pub fn bootstrap(init: Vec<u8>, modules: Vec<(String, Vec<u8>)>) -> Vec<Entry> {
    let mut e = vec![
        Entry::Dir("dev".into()),
        Entry::Char {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: init,
        },
    ];
    if !modules.is_empty() {
        e.push(Entry::Dir("modules".into()));
        let order: String = modules
            .iter()
            .map(|(name, _)| format!("{name}\n"))
            .collect();
        e.push(Entry::File {
            path: "modules/order".into(),
            mode: 0o444,
            data: order.into_bytes(),
        });
        for (name, data) in modules {
            e.push(Entry::File {
                path: format!("modules/{name}.ko"),
                mode: 0o644,
                data,
            });
        }
    }
    e.extend(["proc", "rootfs", "sys", "tmp"].map(|d| Entry::Dir(d.into())));
    e
}

/// The command and environment the Dockerfile declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Reads `ENTRYPOINT ["…", …]` and every `ENV NAME=value` line of a Dockerfile's final stage
/// (after its last `FROM`: the build stages' settings are not in the image).
pub fn launch_from_dockerfile(text: &str) -> Result<Launch, Error> {
    let mut cmd = None;
    let mut env = Vec::new();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .map_or(0, |i| i + 1);
    for line in lines.iter().skip(last_from) {
        if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            let v: Vec<String> = serde_json::from_str(rest)
                .map_err(|e| Error::Dockerfile(format!("ENTRYPOINT is not a JSON array: {e}")))?;
            cmd = Some(v);
        } else if let Some(rest) = line.strip_prefix("ENV ") {
            let (k, v) = rest
                .split_once('=')
                .filter(|(k, v)| !k.contains(char::is_whitespace) && !v.ends_with('\\'))
                .ok_or_else(|| Error::Dockerfile(format!("cannot read `{line}`")))?;
            env.push((k.to_string(), v.to_string()));
        }
    }
    let cmd = cmd
        .filter(|c| !c.is_empty())
        .ok_or_else(|| Error::Dockerfile("no ENTRYPOINT".into()))?;
    Ok(Launch { cmd, env })
}

/// The customer ramdisk: `cmd`, `env` and `rootfs/` holding `files` (path, mode, bytes), with
/// the mount points the init uses.
pub fn customer(launch: &Launch, files: Vec<(String, u32, Vec<u8>)>) -> Vec<Entry> {
    let lines = |v: Vec<String>| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    let env = lines(launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect());
    let mut e = vec![
        Entry::File {
            path: "cmd".into(),
            mode: 0o644,
            data: lines(launch.cmd.clone()).into_bytes(),
        },
        Entry::File {
            path: "env".into(),
            mode: 0o644,
            data: env.into_bytes(),
        },
        Entry::Dir("rootfs".into()),
    ];
    e.extend(["dev", "proc", "run", "sys", "tmp"].map(|d| Entry::Dir(format!("rootfs/{d}"))));
    for (path, mode, data) in files {
        e.push(Entry::File {
            path: format!("rootfs/{}", path.trim_start_matches('/')),
            mode,
            data,
        });
    }
    e
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    const DOCKERFILE: &str = include_str!("../../enclave/Dockerfile");

    #[test]
    fn the_dockerfile_entrypoint_and_env_are_read() {
        let l = launch_from_dockerfile(DOCKERFILE).unwrap();
        assert_eq!(l.cmd[0], "/enclave");
        assert!(l
            .cmd
            .windows(2)
            .any(|w| w == ["--listen", "vsock:any:5000"]));
        assert!(l
            .env
            .iter()
            .any(|(k, v)| k == "MALLOC_MMAP_THRESHOLD_" && v == "131072"));
        assert!(
            !l.env.iter().any(|(k, _)| k == "SOURCE_DATE_EPOCH"),
            "a build stage's ENV"
        );
        assert!(launch_from_dockerfile("FROM scratch\n").is_err());
        assert!(launch_from_dockerfile("ENTRYPOINT /enclave\n").is_err());
        assert!(launch_from_dockerfile("ENV A=1 \\\nENTRYPOINT [\"/x\"]\n").is_err());
    }

    /// Every entry of an archive: name, mode, contents (owner and mtime checked to be 0).
    fn read_back(a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut r = a;
        let mut seen = Vec::new();
        loop {
            let mut e = cpio::NewcReader::new(r).unwrap();
            if e.entry().is_trailer() {
                return seen;
            }
            assert_eq!(
                (e.entry().mtime(), e.entry().uid(), e.entry().gid()),
                (0, 0, 0)
            );
            let (name, mode) = (e.entry().name().to_string(), e.entry().mode());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            seen.push((name, mode, data));
            r = e.finish().unwrap();
        }
    }

    #[test]
    fn archives_are_deterministic_and_read_back() {
        let l = launch_from_dockerfile(DOCKERFILE).unwrap();
        let build = || {
            cpio(&customer(
                &l,
                vec![("/enclave".into(), 0o555, b"\x7fELF...".to_vec())],
            ))
            .unwrap()
        };
        let a = build();
        assert_eq!(a, build());
        let seen = read_back(&a);
        let find = |n: &str| seen.iter().find(|s| s.0 == n).unwrap();
        assert_eq!(find("rootfs/enclave").1, 0o100555);
        assert_eq!(find("rootfs/enclave").2, b"\x7fELF...");
        assert_eq!(find("rootfs/tmp").1, 0o040755);
        assert!(String::from_utf8_lossy(&find("cmd").2).starts_with("/enclave\n"));
        assert!(String::from_utf8_lossy(&find("env").2).contains("MALLOC_MMAP_THRESHOLD_=131072\n"));
    }

    #[test]
    fn the_bootstrap_ramdisk_has_a_console_the_init_and_the_modules() {
        let e = bootstrap(
            b"init".to_vec(),
            vec![
                ("vsock".into(), b"ko1".to_vec()),
                ("nsm".into(), b"ko2".to_vec()),
            ],
        );
        let seen = read_back(&cpio(&e).unwrap());
        let find = |n: &str| seen.iter().find(|s| s.0 == n).unwrap();
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("modules/nsm.ko").2, b"ko2");
        // The order they were given in, which the init follows.
        assert_eq!(find("modules/order").2, b"vsock\nnsm\n");
    }
}
