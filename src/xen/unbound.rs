//! Stand-in for the hypervisor handle in a build without Xen bindings
//! (`cfg(xenmig_no_xen_bindings)`): same interface, and opening it says
//! why there are no bindings and how to get them.

use super::disk::XenstoreRead;
use super::domain::{Domain, DomainRef, RawInfo};
use super::{XenError, NO_BINDINGS_REASON};

/// Cannot be constructed: [`Xen::open`] always fails in this build.
pub struct Xen {
    never: std::convert::Infallible,
}

impl Xen {
    pub fn open() -> Result<Xen, XenError> {
        Err(XenError::NoBindings {
            reason: NO_BINDINGS_REASON.unwrap_or("headers or libclang missing at build time").to_string(),
        })
    }

    pub fn version(&self) -> String {
        match self.never {}
    }

    pub fn toolstack_version(&self) -> Result<String, XenError> {
        match self.never {}
    }

    pub fn raw_domains(&self) -> Result<Vec<RawInfo>, XenError> {
        match self.never {}
    }

    pub fn domains(&self) -> Result<Vec<Domain>, XenError> {
        match self.never {}
    }

    pub fn domain(&self, _: &DomainRef) -> Result<Domain, XenError> {
        match self.never {}
    }

    pub fn pause(&self, _: &DomainRef) -> Result<Domain, XenError> {
        match self.never {}
    }

    pub fn unpause(&self, _: &DomainRef) -> Result<Domain, XenError> {
        match self.never {}
    }

    pub fn resume(&self, _: u32) -> Result<(), XenError> {
        match self.never {}
    }

    pub fn uuid(&self, _: u32) -> Option<String> {
        match self.never {}
    }
}

impl XenstoreRead for Xen {
    fn read(&self, _: &str) -> Option<String> {
        match self.never {}
    }

    fn list(&self, _: &str) -> Vec<String> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_says_how_to_get_bindings() {
        let e = Xen::open().err().expect("cannot open without bindings");
        assert!(e.to_string().contains("built without Xen bindings"), "{e}");
    }
}
