//! Names the pair and cluster files hold, by one rule for every user of
//! them (the arbiters keep names in keys, files and protocol lines), and
//! the groups they name.

use std::ffi::CString;

/// Longest VM or holder name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A VM or host name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`,
/// the first a letter or digit (so no `.`, `..` or `-`, which are a path or
/// the witness protocol's "no holder").
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// The id of group `name`, or None if there is no such group.
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live buffer of the size given;
    // getgrnam_r fills `group` (pointing into `buf`) and sets `found`.
    let ret = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            group.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if ret != 0 || found.is_null() {
        return None;
    }
    // SAFETY: `found` is non-null, so getgrnam_r initialised `group`.
    Some(unsafe { group.assume_init() }.gr_gid)
}
