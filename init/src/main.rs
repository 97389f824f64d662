//! PID 1 of the enclave image (the EIF's bootstrap ramdisk), doing what AWS's own init does
//! (aws-nitro-enclaves-sdk-bootstrap, `init/init.c`, which `nitro-cli build-enclave` puts in
//! every EIF), so an image built without Docker or nitro-cli boots the same way:
//!
//! 1. `/dev` (devtmpfs) and `/dev/console` as stdin, stdout and stderr;
//! 2. the kernel modules the bootstrap ramdisk carries, in the order `/modules/order` lists them
//!    (written by `enclave-image` from the list beside the kernel choice in
//!    scripts/qemu/build-eif.sh: AWS's kernel has vsock built in and needs `nsm.ko` only;
//!    Debian's, used under QEMU, needs five);
//! 3. the heartbeat: connect to the parent (CID 3) on vsock port 9000, send 0xB7, expect 0xB7
//!    back (nitro-cli's `run-enclave` waits for it; so does our QEMU runner);
//! 4. `/cmd` and `/env` from the customer ramdisk (one argument, one `NAME=value` per line);
//! 5. `/rootfs` made the root (bind mount, move onto `/`, chroot), `/dev`, `/proc`, `/sys`,
//!    `/run` and `/tmp` mounted inside it;
//! 6. the command started with that environment, orphans reaped, and the enclave shut down
//!    when the command exits: an enclave that stopped serving must not linger.
//!
//! Every failure is written to the console and ends the enclave (reboot, which Nitro and our
//! QEMU runner both treat as the end): PID 1 must never exit, which would panic the kernel.

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::SigSet;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, Pid};
use std::ffi::CString;
use std::io::{Read, Write};

/// The parent instance's vsock CID, the port and the byte of nitro-cli's boot heartbeat
/// (`VSOCK_CID`, `VSOCK_PORT`, `HEART_BEAT` in AWS's init.c).
const PARENT_CID: u32 = 3;
const HEARTBEAT_PORT: u32 = 9000;
const HEARTBEAT: u8 = 0xB7;

/// The modules to load, one name per line, dependencies first; each is `/modules/NAME.ko`.
const MODULE_ORDER: &str = "/modules/order";

/// Longest `/cmd`, `/env` or `/modules/order` read, in bytes: they come from the image, but a bound costs nothing.
const MAX_CONFIG: u64 = 64 << 10;

/// Where a step failed, for the console.
#[derive(Debug)]
struct Failed {
    step: String,
    cause: String,
}

fn failed(step: impl Into<String>) -> impl FnOnce(Errno) -> Failed {
    let step = step.into();
    move |e| Failed {
        step,
        cause: e.desc().to_string(),
    }
}

fn io_failed(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Failed {
    let step = step.into();
    move |e| Failed {
        step,
        cause: e.to_string(),
    }
}

fn main() {
    // Signals stay blocked in PID 1 (as AWS's init): SIGCHLD still ends waitpid.
    let _ = SigSet::all().thread_block();
    let code = match run() {
        Ok(()) => 0,
        Err(f) => {
            let _ = writeln!(std::io::stderr(), "enclave-init: {}: {}", f.step, f.cause);
            1
        }
    };
    let _ = writeln!(std::io::stderr(), "enclave-init: shutting down ({code})");
    nix::unistd::sync();
    // Only returns on failure; there is nothing left to do then but wait for the end.
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::park();
    }
}

fn run() -> Result<(), Failed> {
    mount_dev()?;
    console()?;
    load_modules()?;
    heartbeat()?;
    let cmd = config("/cmd")?;
    let env = config("/env")?;
    enter_rootfs()?;
    mount_dev()?;
    for (source, target, fstype, data) in [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", None),
    ] {
        let _ = std::fs::create_dir_all(target);
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data,
        )
        .map_err(failed(format!("mount {target}")))?;
    }
    launch(&cmd, &env)
}

/// devtmpfs on `/dev`; already mounted (`devtmpfs.mount=1`) is fine.
fn mount_dev() -> Result<(), Failed> {
    let _ = std::fs::create_dir_all("/dev");
    match mount(
        Some("dev"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(failed("mount /dev")(e)),
    }
}

fn console() -> Result<(), Failed> {
    let fd =
        open("/dev/console", OFlag::O_RDWR, Mode::empty()).map_err(failed("open /dev/console"))?;
    dup2_stdin(&fd).map_err(failed("console"))?;
    dup2_stdout(&fd).map_err(failed("console"))?;
    dup2_stderr(&fd).map_err(failed("console"))?;
    Ok(())
}

fn load_modules() -> Result<(), Failed> {
    // An image whose kernel has everything built in carries no modules.
    if !std::path::Path::new(MODULE_ORDER).exists() {
        return Ok(());
    }
    let order = read_small(MODULE_ORDER)?;
    for name in module_names(&order).map_err(|cause| Failed {
        step: format!("read {MODULE_ORDER}"),
        cause,
    })? {
        let path = format!("/modules/{name}.ko");
        let file = std::fs::File::open(&path).map_err(io_failed(format!("open {path}")))?;
        let params = CString::default();
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            // Built into this kernel after all.
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(failed(format!("load {path}"))(e)),
        }
        drop(file);
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// The module names of `/modules/order`: one per line, blank lines skipped; a name is what a
/// kernel module's file is called (letters, digits, `_`, `-`), so none can leave `/modules`.
fn module_names(order: &str) -> Result<Vec<&str>, String> {
    order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                Ok(l)
            } else {
                Err(format!("{l:?} is not a module name"))
            }
        })
        .collect()
}

fn heartbeat() -> Result<(), Failed> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(failed("vsock socket"))?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(PARENT_CID, HEARTBEAT_PORT),
    )
    .map_err(failed("heartbeat: connect to 3:9000"))?;
    let mut sock = std::fs::File::from(fd);
    sock.write_all(&[HEARTBEAT])
        .map_err(io_failed("heartbeat: write"))?;
    let mut back = [0u8; 1];
    sock.read_exact(&mut back)
        .map_err(io_failed("heartbeat: read"))?;
    if back != [HEARTBEAT] {
        return Err(Failed {
            step: "heartbeat".into(),
            cause: format!("the parent answered {:#04x}, not {HEARTBEAT:#04x}", back[0]),
        });
    }
    Ok(())
}

/// The lines of `path` (empty lines dropped), then the file removed, as AWS's init does.
fn config(path: &str) -> Result<Vec<String>, Failed> {
    let text = read_small(path)?;
    let _ = std::fs::remove_file(path);
    parse_config(&text).map_err(|cause| Failed {
        step: format!("read {path}"),
        cause,
    })
}

/// A file of the image, at most [`MAX_CONFIG`] bytes of UTF-8.
fn read_small(path: &str) -> Result<String, Failed> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG + 1).read_to_string(&mut text))
        .map_err(io_failed(format!("read {path}")))?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(Failed {
            step: format!("read {path}"),
            cause: format!("longer than {MAX_CONFIG} bytes"),
        });
    }
    Ok(text)
}

/// One entry per non-empty line.
fn parse_config(text: &str) -> Result<Vec<String>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.contains('\0') {
                Err("a line holds a NUL byte".to_string())
            } else {
                Ok(l.to_string())
            }
        })
        .collect()
}

/// `/rootfs` becomes `/` (AWS's init: bind mount, move onto `/`, chroot).
fn enter_rootfs() -> Result<(), Failed> {
    mount(
        Some("/rootfs"),
        "/rootfs",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(failed("mount --bind /rootfs /rootfs"))?;
    chdir("/rootfs").map_err(failed("chdir /rootfs"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(failed("mount --move /rootfs /"))?;
    chroot(".").map_err(failed("chroot"))?;
    chdir("/").map_err(failed("chdir /"))?;
    Ok(())
}

/// Starts the command (std's spawn gives the child an empty signal mask, so the enclave does
/// not inherit PID 1's blocked signals) and reaps every child until it exits.
fn launch(cmd: &[String], env: &[String]) -> Result<(), Failed> {
    let Some((program, args)) = cmd.split_first() else {
        return Err(Failed {
            step: "/cmd".into(),
            cause: "no command".into(),
        });
    };
    let child = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .spawn()
        .map_err(io_failed(format!("start {program}")))?;
    let child = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                return Err(Failed {
                    step: "the enclave".into(),
                    cause: format!("exited with status {code}"),
                })
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                return Err(Failed {
                    step: "the enclave".into(),
                    cause: format!("killed by {sig}"),
                })
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(failed("wait")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_become_arguments_and_a_nul_is_refused() {
        let args = parse_config("/enclave\n--listen\nvsock:any:5000\n\n").unwrap();
        assert_eq!(args.len(), 3);
        assert_eq!(args[2], "vsock:any:5000");
        assert!(parse_config("a\0b\n").is_err());
    }

    #[test]
    fn modules_load_in_the_listed_order_and_only_by_name() {
        assert_eq!(
            module_names("vsock\n\nvmw_vsock_virtio_transport\nnsm\n").unwrap(),
            ["vsock", "vmw_vsock_virtio_transport", "nsm"]
        );
        assert!(module_names("../rootfs/enclave\n").is_err());
        assert!(module_names("nsm.ko\n").is_err());
        assert!(module_names("").unwrap().is_empty());
    }
}
