//! Authentication of the replication channel and the witness.
//!
//! Both ends hold a pre-shared key (`[ft] psk_file`). On connect:
//!
//! ```text
//! client → server   nonce_c                        (32 fresh random bytes)
//! server → client   nonce_s, HMAC(psk, "server" ‖ nonce_c ‖ nonce_s)
//! client → server   HMAC(psk, "client" ‖ nonce_c ‖ nonce_s)
//! ```
//!
//! Each side checks the other's proof, so neither talks to a peer without
//! the key. The session key is HKDF-SHA256(salt = nonce_c ‖ nonce_s,
//! ikm = psk), fresh for every connection. From then on every frame carries
//! HMAC-SHA256(session key, direction ‖ sequence number ‖ frame), with the
//! sequence number counted by both ends and never sent: a modified frame, a
//! frame from someone else, one replayed from this session (wrong sequence)
//! or from an earlier one (wrong key) fails the check.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of a nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a proof or a frame MAC.
pub const MAC_LEN: usize = 32;
/// A key file holds this many hex digits (256 bits from the kernel's
/// random source, as `tandem keygen` writes them).
pub const KEY_HEX_LEN: usize = 64;

/// Frames from the connecting side (secondary, witness client).
pub const CLIENT_TO_SERVER: u8 = 1;
/// Frames from the accepting side (primary, witness).
pub const SERVER_TO_CLIENT: u8 = 2;

const SESSION_INFO: &[u8] = b"tandem session key v2 ";

/// A fresh nonce.
pub type Nonce = [u8; NONCE_LEN];

/// A pre-shared key, read from a file only its owner can read, or derived
/// from one for a single purpose (see [`Psk::for_replication`]).
#[derive(Clone)]
pub struct Psk {
    key: Vec<u8>,
    path: PathBuf,
    /// What the key is for, bound into every proof and session key: a key
    /// made for one purpose proves nothing for another.
    label: String,
    /// Messages under this key are encrypted (a replication key made with
    /// `encrypt`), not only authenticated.
    encrypts: bool,
}

/// The label of a key used as the file holds it: a witness's own key.
const WITNESS_LABEL: &str = "tandem witness v2";

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key itself.
        write!(f, "Psk({})", self.path.display())
    }
}

/// Reads a secret from `path` (at most 64 KiB): the file itself (not a
/// symbolic link), owned by this user or root, and not open to group or
/// others, all checked on the opened file; anything else is refused with
/// one line that names `what` and says why. Key files, etcd passwords and
/// TLS private keys are read through here.
pub fn read_private_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                format!("{what} {shown} is a symbolic link: give the file itself")
            }
            _ => format!("{what} {shown}: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{what} {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{what} {shown} is not a regular file"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "{what} {shown} belongs to uid {}, not to this user (uid {me}) or root",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} is open to other users (mode {mode:03o}); run `chmod 600 {shown}`"
        ));
    }
    let mut bytes = Vec::new();
    file.take(64 << 10)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} {shown}: {e}"))?;
    Ok(bytes)
}

impl Psk {
    /// Reads the key in `path`, as `tandem keygen` writes it: 64 hex
    /// digits (surrounding whitespace ignored). The file itself (not a
    /// symbolic link), owned by this user or root, and not open to group or
    /// others, all checked on the opened file; anything else is refused with
    /// one line that says why.
    pub fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let bytes = read_private_file(path, "key file")?;
        let key = bytes.trim_ascii().to_vec();
        if key.len() != KEY_HEX_LEN || !key.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!(
                "key file {shown} does not hold a tandem key ({KEY_HEX_LEN} hex digits, 256 random bits): weak keys are refused; make one with `tandem keygen FILE`"
            ));
        }
        Ok(Self {
            key,
            path: path.to_owned(),
            label: WITNESS_LABEL.into(),
            encrypts: false,
        })
    }

    /// The pair's replication key, from the pair's key file: bound to the
    /// VM's name, both hosts' names and whether the link is encrypted,
    /// so it authenticates this pair's replication link and nothing else
    /// (not another pair sharing the file, not a witness).
    pub fn for_replication(&self, vm: &str, hosts: [&str; 2], encrypt: bool) -> Self {
        let mode = if encrypt { "aead" } else { "mac" };
        let mut derived = self.derive(
            &format!("tandem replication v2 {mode}"),
            &[vm, hosts[0], hosts[1]],
        );
        derived.encrypts = encrypt;
        derived
    }

    /// Whether messages under this key are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypts
    }

    /// The key this pair proves itself with at a witness, from the pair's
    /// key file: bound to the VM's name. The witness is given this key
    /// (`tandem keygen --witness-key-for PAIR_FILE FILE`), never the file
    /// it came from, so it cannot derive the replication key.
    pub fn for_witness(&self, vm: &str) -> Self {
        let mut derived = self.derive("tandem witness key v2", &[vm]);
        // As the witness will read it from a file: the hex text.
        derived.label = WITNESS_LABEL.into();
        derived
    }

    fn derive(&self, label: &str, context: &[&str]) -> Self {
        let mut info = label.as_bytes().to_vec();
        for part in context {
            info.push(0);
            info.extend_from_slice(part.as_bytes());
        }
        let hk = hkdf::Hkdf::<Sha256>::new(None, &self.key);
        let mut out = [0u8; 32];
        hk.expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Self {
            key: to_hex(&out).into_bytes(),
            path: self.path.clone(),
            label: label.into(),
            encrypts: false,
        }
    }

    /// The key as `tandem keygen` writes it (for a derived witness key).
    pub fn to_key_file_text(&self) -> String {
        format!("{}\n", String::from_utf8_lossy(&self.key))
    }

    /// A short public name of the key (which of its keys a witness should
    /// use): SHA-256 of it, 8 bytes; says nothing about the key itself.
    pub fn key_id(&self) -> [u8; 8] {
        use sha2::Digest;
        let digest = Sha256::new()
            .chain_update(b"tandem key id\0")
            .chain_update(&self.key)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        id
    }

    /// A key from bytes (tests).
    #[cfg(test)]
    pub fn from_bytes(key: &[u8]) -> Self {
        Self {
            key: key.to_vec(),
            path: PathBuf::from("(in memory)"),
            label: WITNESS_LABEL.into(),
            encrypts: false,
        }
    }

    /// The file the key came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn proof(&self, role: &[u8], client: &Nonce, server: &Nonce) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(self.label.as_bytes());
        mac.update(&[0]);
        mac.update(role);
        mac.update(client);
        mac.update(server);
        mac
    }

    /// The server's proof that it holds the key.
    pub fn server_proof(&self, client: &Nonce, server: &Nonce) -> [u8; MAC_LEN] {
        self.proof(b"server", client, server)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The client's proof that it holds the key.
    pub fn client_proof(&self, client: &Nonce, server: &Nonce) -> [u8; MAC_LEN] {
        self.proof(b"client", client, server)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the server's proof (in constant time).
    pub fn check_server_proof(&self, client: &Nonce, server: &Nonce, proof: &[u8]) -> bool {
        self.proof(b"server", client, server)
            .verify_slice(proof)
            .is_ok()
    }

    /// Checks the client's proof (in constant time).
    pub fn check_client_proof(&self, client: &Nonce, server: &Nonce, proof: &[u8]) -> bool {
        self.proof(b"client", client, server)
            .verify_slice(proof)
            .is_ok()
    }

    /// This connection's key, from both nonces.
    pub fn session_key(&self, client: &Nonce, server: &Nonce) -> [u8; 32] {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(client);
        salt[NONCE_LEN..].copy_from_slice(server);
        let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), &self.key);
        let mut out = [0u8; 32];
        let info = [SESSION_INFO, self.label.as_bytes()].concat();
        hk.expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

/// A fresh random nonce from the kernel.
pub fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(n)
}

/// Writes a new random key to `path` (64 hex digits, mode 0600); never
/// overwrites a file.
pub fn keygen(path: &Path) -> Result<(), String> {
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| format!("no random bytes: {e}"))?;
    write_new_key_file(path, &format!("{}\n", to_hex(&key)))
}

/// Writes `text` to a new file `path` (mode 0600, fsynced); never
/// overwrites one.
fn write_new_key_file(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write key file {}: {e}", path.display()))
}

/// One direction of an authenticated session: seals or opens frames in
/// order, counting them.
pub struct FrameMac {
    key: [u8; 32],
    direction: u8,
    seq: u64,
}

impl FrameMac {
    /// The MAC state for frames going `direction` under `key`.
    pub fn new(key: [u8; 32], direction: u8) -> Self {
        Self {
            key,
            direction,
            seq: 0,
        }
    }

    /// The sequence number of the next frame.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(&[self.direction]);
        mac.update(&self.seq.to_le_bytes());
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// The MAC of the next frame (made of `parts`).
    pub fn seal(&mut self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let tag = self.mac(parts).finalize().into_bytes().into();
        self.seq += 1;
        tag
    }

    /// Checks the next frame's MAC; the count moves on only if it holds.
    pub fn open(&mut self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let ok = self.mac(parts).verify_slice(tag).is_ok();
        if ok {
            self.seq += 1;
        }
        ok
    }
}

/// Writes the witness key of the pair in `pair_file` (derived from its
/// psk_file for its VM) to `path`, as [`keygen`] writes keys; returns the
/// VM's name.
pub fn write_witness_key(pair_file: &Path, path: &Path) -> Result<String, String> {
    let cfg = tandem_config::load(pair_file).map_err(|e| e.to_string())?;
    let Some(psk_file) = &cfg.ft.psk_file else {
        return Err(format!("{}: no [ft] psk_file", pair_file.display()));
    };
    let base = Psk::load(psk_file)?;
    let key = base.for_witness(&cfg.vm.name);
    write_new_key_file(path, &key.to_key_file_text())?;
    Ok(cfg.vm.name.clone())
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string of exactly `N` bytes.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk(k: &str) -> Psk {
        Psk::from_bytes(k.as_bytes())
    }

    #[test]
    fn proofs_hold_only_under_the_same_key() {
        let (a, b) = (psk("0123456789abcdef0123"), psk("0123456789abcdef0124"));
        let (nc, ns) = ([1u8; 32], [2u8; 32]);
        assert!(a.check_server_proof(&nc, &ns, &a.server_proof(&nc, &ns)));
        assert!(a.check_client_proof(&nc, &ns, &a.client_proof(&nc, &ns)));
        assert!(!b.check_server_proof(&nc, &ns, &a.server_proof(&nc, &ns)));
        // A server's proof is no client proof (reflection).
        assert!(!a.check_client_proof(&nc, &ns, &a.server_proof(&nc, &ns)));
        // Other nonces: a captured proof is worthless.
        assert!(!a.check_server_proof(&nc, &[3u8; 32], &a.server_proof(&nc, &ns)));
    }

    #[test]
    fn session_keys_differ_per_connection_and_per_key() {
        let k = psk("0123456789abcdef0123");
        let s1 = k.session_key(&[1; 32], &[2; 32]);
        assert_eq!(s1, k.session_key(&[1; 32], &[2; 32]));
        assert_ne!(s1, k.session_key(&[1; 32], &[3; 32]));
        assert_ne!(
            s1,
            psk("another key entirely").session_key(&[1; 32], &[2; 32])
        );
    }

    #[test]
    fn frames_open_only_unmodified_in_order_in_their_direction() {
        let key = [7u8; 32];
        let mut tx = FrameMac::new(key, CLIENT_TO_SERVER);
        let mut rx = FrameMac::new(key, CLIENT_TO_SERVER);
        let t0 = tx.seal(&[b"head", b"frame zero"]);
        let t1 = tx.seal(&[b"head", b"frame one"]);
        // Out of order (a replay of a later frame, or a dropped one).
        assert!(!rx.open(&[b"head", b"frame one"], &t1));
        // Modified.
        assert!(!rx.open(&[b"head", b"frame zerO"], &t0));
        assert!(rx.open(&[b"head", b"frame zero"], &t0));
        // Replayed.
        assert!(!rx.open(&[b"head", b"frame zero"], &t0));
        assert!(rx.open(&[b"head", b"frame one"], &t1));
        // The other direction's MAC.
        let mut back = FrameMac::new(key, SERVER_TO_CLIENT);
        let mut rx2 = FrameMac::new(key, CLIENT_TO_SERVER);
        assert!(!rx2.open(&[b"x"], &back.seal(&[b"x"])));
    }

    #[test]
    fn only_private_keygen_keys_in_the_file_itself_are_accepted() {
        let dir = std::env::temp_dir().join(format!("tandem-psk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let private = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let good = dir.join("good.psk");
        keygen(&good).unwrap();
        assert!(Psk::load(&good).is_ok());
        assert!(keygen(&good).unwrap_err().contains("cannot create"));
        // Weak: a password, too short, not hex.
        for (name, text) in [
            ("password", "password1234567890\n"),
            ("short", "0123abcd\n"),
            ("nothex", &"z".repeat(64)),
        ] {
            let e = Psk::load(&private(name, text)).unwrap_err();
            assert!(e.contains("weak keys are refused"), "{name}: {e}");
        }
        let open = private("open", &"ab".repeat(32));
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::load(&open).unwrap_err();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        let link = dir.join("link.psk");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let e = Psk::load(&link).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let foreign = private("foreign", &"cd".repeat(32));
            std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
            let e = Psk::load(&foreign).unwrap_err();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        let e = Psk::load(&dir.join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex::<4>(&to_hex(&b)), Some(b));
        assert_eq!(from_hex::<4>("00"), None);
        assert_eq!(from_hex::<1>("zz"), None);
        assert_eq!(from_hex::<1>("é"), None);
    }
}
