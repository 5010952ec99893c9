//! Running under systemd. This module owns the two things the service manager
//! hands a process in its environment:
//!
//! - socket activation ([`listen_fds`]): the listening TCP socket passed as
//!   fd 3 with `LISTEN_FDS`/`LISTEN_PID`;
//! - the notification socket ([`Notifier`]): `READY=1`, `STOPPING=1`,
//!   `STATUS=…` and watchdog pings to `NOTIFY_SOCKET`.
//!
//! Both are no-ops when those variables are absent. They are implemented on
//! std and libc (the protocol is a few datagrams and one fd) and take their
//! variables out of the environment, as `sd_listen_fds(1)` and
//! `sd_notify(1, …)` do, so child processes (Nix) never act on them.

use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// systemd passes activated sockets from this descriptor on.
pub(crate) const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("{var}={value:?} from systemd is not a number")]
    NotANumber { var: &'static str, value: String },
    #[error("systemd passed file descriptor {fd}: {source}")]
    Fd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("systemd passed file descriptor {fd}, which is not a listening TCP socket (nixery-local.socket needs ListenStream=ADDRESS:PORT)")]
    NotTcpListener { fd: RawFd },
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    NotifySocketAddress(String),
    #[error("opening a socket to send notifications to systemd: {0}")]
    NotifySocket(#[source] io::Error),
    #[error("sending {message:?} to systemd: {source}")]
    Send {
        message: String,
        #[source]
        source: io::Error,
    },
}

/// The listener systemd passed this process (socket activation), or `None`
/// when not socket-activated. Only the first socket is used: the shipped
/// `nixery-local.socket` has one `ListenStream=`.
///
/// Reads and unsets `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`. Call it
/// before starting any thread: changing the environment is not thread-safe.
pub fn listen_fds() -> Result<Option<TcpListener>, SystemdError> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(count) = passed_fd_count(fds.as_deref(), pid.as_deref(), std::process::id())? else {
        return Ok(None);
    };
    // Our children (Nix) must not inherit the sockets, or a stopped daemon's
    // port would stay open while a build runs.
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        set_cloexec(fd)?;
    }
    if count > 1 {
        tracing::warn!(
            count,
            "systemd passed several sockets; serving only the first"
        );
    }
    let fd = LISTEN_FDS_START;
    check_tcp_listener(fd)?;
    // SAFETY: systemd passed `fd` to this process for it to own, we checked it
    // is an open listening socket, and nothing else in the process has
    // claimed it (the variables that announce it are gone now).
    Ok(Some(unsafe { TcpListener::from_raw_fd(fd) }))
}

/// How many sockets systemd passed, from `LISTEN_FDS` and `LISTEN_PID`.
/// `None` when they are absent, zero, or meant for another process (an
/// ancestor that did not unset them).
fn passed_fd_count(
    fds: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> Result<Option<RawFd>, SystemdError> {
    let (Some(fds), Some(pid)) = (fds, pid) else {
        return Ok(None);
    };
    let pid: u32 = pid.trim().parse().map_err(|_| SystemdError::NotANumber {
        var: "LISTEN_PID",
        value: pid.to_owned(),
    })?;
    if pid != our_pid {
        return Ok(None);
    }
    let count: RawFd = fds.trim().parse().map_err(|_| SystemdError::NotANumber {
        var: "LISTEN_FDS",
        value: fds.to_owned(),
    })?;
    Ok((count > 0).then_some(count))
}

fn set_cloexec(fd: RawFd) -> Result<(), SystemdError> {
    let fd_error = |source| SystemdError::Fd { fd, source };
    // SAFETY: fcntl on an integer fd reads and sets flags; an invalid fd
    // gives EBADF, which we report.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(fd_error(io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(fd_error(io::Error::last_os_error()));
    }
    Ok(())
}

fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Whether `fd` is a listening IPv4/IPv6 stream socket; anything else (a
/// unix socket, a datagram socket, a file) would fail in confusing ways
/// later.
fn check_tcp_listener(fd: RawFd) -> Result<(), SystemdError> {
    let query = |option| {
        socket_option(fd, option).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => SystemdError::NotTcpListener { fd },
            _ => SystemdError::Fd { fd, source: e },
        })
    };
    let domain = query(libc::SO_DOMAIN)?;
    let kind = query(libc::SO_TYPE)?;
    let listening = query(libc::SO_ACCEPTCONN)?;
    if (domain == libc::AF_INET || domain == libc::AF_INET6)
        && kind == libc::SOCK_STREAM
        && listening != 0
    {
        Ok(())
    } else {
        Err(SystemdError::NotTcpListener { fd })
    }
}

/// Sends state changes to the service manager. Cheap to clone; a disabled
/// notifier (not under systemd, or `Type=simple`) does nothing.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    inner: Option<Arc<Channel>>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Channel {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, which it
    /// unsets. Call it before starting any thread, like [`listen_fds`].
    pub fn from_env() -> Result<Notifier, SystemdError> {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let watchdog = watchdog_from(usec.as_deref(), pid.as_deref(), std::process::id())?;
        match socket.filter(|s| !s.is_empty()) {
            None => Ok(Notifier::disabled()),
            Some(path) => Notifier::connect(&path, watchdog),
        }
    }

    /// A notifier sending to `path` (`/run/…` or `@abstract`).
    pub(crate) fn connect(
        path: &str,
        watchdog: Option<Duration>,
    ) -> Result<Notifier, SystemdError> {
        let addr = notify_address(path)?;
        let socket = UnixDatagram::unbound().map_err(SystemdError::NotifySocket)?;
        Ok(Notifier {
            inner: Some(Arc::new(Channel { socket, addr })),
            watchdog,
        })
    }

    #[cfg(test)]
    pub(crate) fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The service is up and accepting connections.
    pub fn ready(&self) -> Result<(), SystemdError> {
        self.send("READY=1")
    }

    /// The service is shutting down (draining requests).
    pub fn stopping(&self) -> Result<(), SystemdError> {
        self.send("STOPPING=1")
    }

    /// One line of status for `systemctl status`.
    #[cfg(test)]
    pub(crate) fn status(&self, status: &str) -> Result<(), SystemdError> {
        // A newline would start another assignment.
        self.send(&format!("STATUS={}", status.replace('\n', " ")))
    }

    /// Tells the watchdog the service is alive.
    pub(crate) fn watchdog_ping(&self) -> Result<(), SystemdError> {
        self.send("WATCHDOG=1")
    }

    /// The watchdog timeout (`WatchdogSec=`), if systemd enabled one for
    /// this process; pings must come more often than this.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.inner.as_ref().and(self.watchdog)
    }

    /// With a watchdog enabled, a task on the current tokio runtime that pings
    /// at half the timeout, so a runtime that stops scheduling gets the
    /// service restarted. Must be called inside the runtime.
    pub fn spawn_watchdog(&self) -> Option<tokio::task::JoinHandle<()>> {
        let period = self.watchdog_interval()? / 2;
        let notifier = self.clone();
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            loop {
                ticks.tick().await;
                if let Err(e) = notifier.watchdog_ping() {
                    tracing::warn!(error = %e, "watchdog ping failed");
                }
            }
        }))
    }

    fn send(&self, message: &str) -> Result<(), SystemdError> {
        let Some(channel) = &self.inner else {
            return Ok(());
        };
        channel
            .socket
            .send_to_addr(message.as_bytes(), &channel.addr)
            .map(drop)
            .map_err(|source| SystemdError::Send {
                message: message.to_owned(),
                source,
            })
    }
}

fn notify_address(path: &str) -> Result<SocketAddr, SystemdError> {
    let bad = |_| SystemdError::NotifySocketAddress(path.to_owned());
    if let Some(name) = path.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(bad)
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(path).map_err(bad)
    } else {
        // e.g. systemd's `vsock:CID:PORT`, which a host service never gets.
        Err(SystemdError::NotifySocketAddress(path.to_owned()))
    }
}

/// `WATCHDOG_USEC` when it is meant for this process (`WATCHDOG_PID` absent
/// or ours) and non-zero.
fn watchdog_from(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> Result<Option<Duration>, SystemdError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().map_err(|_| SystemdError::NotANumber {
            var: "WATCHDOG_PID",
            value: pid.to_owned(),
        })?;
        if pid != our_pid {
            return Ok(None);
        }
    }
    let usec: u64 = usec.trim().parse().map_err(|_| SystemdError::NotANumber {
        var: "WATCHDOG_USEC",
        value: usec.to_owned(),
    })?;
    Ok((usec > 0).then(|| Duration::from_micros(usec)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn listen_fds_are_ours_only_with_our_pid() {
        assert_eq!(passed_fd_count(None, None, 7).unwrap(), None);
        assert_eq!(passed_fd_count(Some("1"), None, 7).unwrap(), None);
        assert_eq!(passed_fd_count(None, Some("7"), 7).unwrap(), None);
        assert_eq!(passed_fd_count(Some("1"), Some("8"), 7).unwrap(), None);
        assert_eq!(passed_fd_count(Some("0"), Some("7"), 7).unwrap(), None);
        assert_eq!(passed_fd_count(Some("2"), Some("7"), 7).unwrap(), Some(2));
        assert!(passed_fd_count(Some("x"), Some("7"), 7).is_err());
        assert!(passed_fd_count(Some("1"), Some("seven"), 7).is_err());
    }

    #[test]
    fn only_listening_tcp_sockets_are_accepted() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        check_tcp_listener(listener.as_raw_fd()).expect("a TCP listener");

        let stream =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let e = check_tcp_listener(stream.as_raw_fd()).expect_err("connected stream");
        assert!(matches!(e, SystemdError::NotTcpListener { .. }), "{e}");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(check_tcp_listener(udp.as_raw_fd()).is_err());

        let file = tempfile::tempfile().expect("file");
        let e = check_tcp_listener(file.as_raw_fd()).expect_err("a file");
        assert!(matches!(e, SystemdError::NotTcpListener { .. }), "{e}");

        let dir = tempfile::tempdir().expect("tmp");
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).expect("unix");
        assert!(check_tcp_listener(unix.as_raw_fd()).is_err());
    }

    #[test]
    fn cloexec_is_set() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = listener.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        set_cloexec(fd).expect("cloexec");
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert!(set_cloexec(-1).is_err());
    }

    #[test]
    fn watchdog_is_for_our_pid_and_nonzero() {
        let s = Some("2000000");
        assert_eq!(watchdog_from(None, None, 7).unwrap(), None);
        assert_eq!(
            watchdog_from(s, None, 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_from(s, Some("7"), 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_from(s, Some("8"), 7).unwrap(), None);
        assert_eq!(watchdog_from(Some("0"), None, 7).unwrap(), None);
        assert!(watchdog_from(Some("soon"), None, 7).is_err());
    }

    #[test]
    fn notify_addresses() {
        assert!(notify_address("/run/systemd/notify").is_ok());
        assert!(notify_address("@abstract-name").is_ok());
        assert!(notify_address("relative").is_err());
        assert!(notify_address("vsock:2:1234").is_err());
        assert!(notify_address(&format!("/{}", "x".repeat(200))).is_err());
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::connect(path.to_str().expect("utf-8"), None).expect("connect");
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready().expect("ready");
        assert_eq!(receive(&server), "READY=1");
        n.status("two\nlines").expect("status");
        assert_eq!(receive(&server), "STATUS=two lines");
        n.stopping().expect("stopping");
        assert_eq!(receive(&server), "STOPPING=1");
        drop(server);
        assert!(n.ready().is_err(), "a vanished socket is an error");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("nixery-local-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::connect(&format!("@{name}"), None).expect("connect");
        n.watchdog_ping().expect("ping");
        assert_eq!(receive(&server), "WATCHDOG=1");
    }

    #[tokio::test]
    async fn the_watchdog_pings_at_half_the_interval() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        server.set_nonblocking(true).expect("nonblocking");
        let interval = Duration::from_millis(400);
        let n = Notifier::connect(path.to_str().expect("utf-8"), Some(interval)).expect("connect");
        assert_eq!(n.watchdog_interval(), Some(interval));
        let task = n.spawn_watchdog().expect("a watchdog task");
        // The first tick is immediate, then one every 200 ms: 0, 200, 400, 600.
        tokio::time::sleep(Duration::from_millis(700)).await;
        task.abort();
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(len) = server.recv(&mut buf) {
            assert_eq!(&buf[..len], b"WATCHDOG=1");
            pings += 1;
        }
        // Timing on a loaded machine is loose; a period of the full interval
        // would give 2.
        assert!((3..=5).contains(&pings), "{pings} pings");
    }

    #[test]
    fn a_disabled_notifier_does_nothing() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().expect("no-op");
        n.stopping().expect("no-op");
        assert_eq!(n.watchdog_interval(), None);
    }
}
