//! TLS for Keel's listeners (`KEEL_TLS_CERT`, `KEEL_TLS_KEY`): one certificate and key,
//! served by the HTTP API, the gRPC API and the admin listener alike, and reloaded when
//! their files change, so a certificate rotated on disk (cert-manager, a renewal cron, a
//! Kubernetes secret's symlink swap) is picked up without a restart.
//!
//! rustls with the ring provider, TLS 1.2 and 1.3. A reload that fails (a half-written
//! file, a key that does not match the certificate yet because the two are replaced one
//! after the other) keeps the identity being served and tries again on the next check; a
//! handshake never meets a missing certificate.
//!
//! Each listener names its protocol by ALPN: `http/1.1` for the API and admin listeners,
//! `h2` for gRPC. A client that offers neither still connects (ALPN is optional); one that
//! offers only the other protocol is refused in the handshake.

use std::convert::Infallible;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The largest certificate chain or key file read, in bytes: far above any real one, and a
/// bound on what a wrong path (a device, a log file) can make the process read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Where the served certificate chain and its private key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key: PathBuf,
}

/// Why a certificate or key could not be served. Each names the file to fix.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the messages say what each variant is
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error(
        "{path} holds no PEM private key (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
    )]
    NoKey { path: PathBuf },
    #[error("the key in {key} cannot be used: {reason}")]
    KeyRejected { key: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the first certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// The file to fix: the key's when the key is unusable or belongs elsewhere.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. }
            | Self::TooLarge { path }
            | Self::NoCertificate { path }
            | Self::BadPem { path, .. }
            | Self::NoKey { path } => path,
            Self::KeyRejected { key, .. } | Self::Mismatch { key, .. } => key,
        }
    }
}

/// The served identity and the files it came from; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Arc<Identity>,
}

#[derive(Debug)]
struct Identity {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// What the files looked like when `key` was read from them.
    stamp: Stamp,
}

/// The modification time and length of the certificate and key files: a change in either
/// means a reload. Paths are followed through symlinks, so a swapped link counts.
type Stamp = [(Option<SystemTime>, u64); 2];

impl Tls {
    /// Reads and checks `files`: a certificate chain, a private key rustls can sign with,
    /// and the key belonging to the chain's first certificate.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = stamp(&files);
        let key = read_identity(&files, &provider)?;
        Ok(Self {
            identity: Arc::new(Identity {
                files,
                provider,
                current: RwLock::new(Loaded {
                    key: Arc::new(key),
                    stamp,
                }),
            }),
        })
    }

    /// The files this identity is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.identity.files
    }

    /// An acceptor offering `alpn` (e.g. `h2`, `http/1.1`), serving the current identity.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let resolver: Arc<dyn ResolvesServerCert> = Arc::clone(&self.identity) as _;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::clone(&self.identity.provider))
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default protocol versions")
                .with_no_client_auth()
                .with_cert_resolver(resolver);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }

    /// Re-reads the files if they changed since the last read. `Ok(true)`: a new identity
    /// is served from the next handshake on. An error leaves the old one served, and the
    /// next call tries again.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let identity = &self.identity;
        let now = stamp(&identity.files);
        if read_lock(&identity.current).stamp == now {
            return Ok(false);
        }
        let key = read_identity(&identity.files, &identity.provider)?;
        let mut current = identity
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Loaded {
            key: Arc::new(key),
            stamp: now,
        };
        Ok(true)
    }

    /// Checks the files every `interval` until `stop`, reloading them when they change.
    pub async fn watch(self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            // File reads and key parsing are blocking work.
            let reloaded = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            match reloaded {
                Ok(Ok(false)) => {}
                Ok(Ok(true)) => {
                    metrics::counter!("keel_tls_reloads_total", "outcome" => "ok").increment(1);
                    tracing::info!(
                        cert = %self.identity.files.cert.display(),
                        "TLS certificate reloaded: new connections get the new one"
                    );
                }
                Ok(Err(e)) => {
                    metrics::counter!("keel_tls_reloads_total", "outcome" => "error").increment(1);
                    tracing::warn!(error = %e, "TLS files changed but cannot be served; still serving the previous certificate");
                }
                Err(e) => tracing::error!(error = %e, "the TLS reload task failed"),
            }
        }
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&read_lock(&self.current).key))
    }
}

fn read_lock(lock: &RwLock<Loaded>) -> std::sync::RwLockReadGuard<'_, Loaded> {
    // A panic while holding the lock cannot leave `Loaded` half-written (it is replaced
    // whole), so a poisoned lock still holds a servable identity.
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key].map(|path| match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(read)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn read_identity(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read_bounded(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key_pem = read_bounded(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: files.key.clone(),
        },
        e => TlsError::BadPem {
            path: files.key.clone(),
            reason: e.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        e => TlsError::KeyRejected {
            key: files.key.clone(),
            reason: e.to_string(),
        },
    })
}

/// Completes the server side of a handshake on `stream` within `limit`. `None` (counted
/// in `keel_tls_handshake_failures_total{listener}`) when the client fails it or is too
/// slow: a client that connects and says nothing holds a connection for `limit`, no more.
pub async fn handshake<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    limit: Duration,
    listener: &'static str,
) -> Option<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let failure = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(listener, error = %e, "TLS handshake failed");
            "error"
        }
        Err(_) => {
            tracing::debug!(listener, "TLS handshake timed out");
            "timeout"
        }
    };
    metrics::counter!("keel_tls_handshake_failures_total", "listener" => listener, "reason" => failure)
        .increment(1);
    None
}

/// Most TLS handshakes one listener runs at once; connections beyond it are closed at once
/// (a flood of connecting clients costs accept calls, not unbounded handshake tasks).
const MAX_HANDSHAKES: usize = 1024;

/// The connections accepted on `listener`, each after its TLS handshake (run concurrently,
/// each within `limit`), for servers that take a stream of connections (tonic). Accepting
/// stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limit: Duration,
    name: &'static str,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, Infallible>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // As on the HTTP listener: not fatal, and no spinning on an fd shortage.
                    tracing::warn!(listener = name, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                metrics::counter!("keel_tls_handshake_failures_total", "listener" => name, "reason" => "too_many")
                    .increment(1);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(tls) = handshake(&acceptor, stream, limit, name).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|conn| (conn, rx))
    })
}
