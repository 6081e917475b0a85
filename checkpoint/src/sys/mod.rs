//! Every `unsafe` of the crate: the synthetic guest's memory mapping and userfaultfd
//! write-protect tracking ([`uffd`]), and the Xen control libraries loaded at run time
//! ([`xen`]). Each unsafe block carries a `// SAFETY:` comment.

pub mod uffd;
pub mod xen;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of descriptor `fd` inherited from the parent process (the synthetic
/// guest's memory and control fds). Call once per descriptor, at start-up.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is a standard stream, not an inherited descriptor"),
        ));
    }
    // Fails with EBADF when nothing is open at `fd`.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)?;
    // SAFETY: `fd` is open (checked above) and, by the spawn convention of `LocalDomain`, was
    // handed to this process for its exclusive use; it is wrapped exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
