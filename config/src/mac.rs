//! The one MAC parser, for the pair file (`[vm] net[i].mac`) and the
//! command line (`tandem run --net tap=NAME,mac=MAC`): six pairs of hex
//! digits separated by colons, naming a NIC (unicast, not all zeros).

use thiserror::Error;

/// Why a text is not a guest NIC's MAC. Shown after the value:
/// `"01:00:5e:00:00:01" is a multicast address; ...`.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum MacError {
    /// Not six colon-separated pairs of hex digits.
    #[error("is not a MAC address (like \"52:54:00:12:34:56\")")]
    Syntax,
    /// `ff:ff:ff:ff:ff:ff`: every host on the segment, not one NIC.
    #[error("is the broadcast address; a NIC needs a unicast MAC")]
    Broadcast,
    /// The group bit (bit 0 of the first byte) is set.
    #[error("is a multicast address; a NIC needs a unicast MAC")]
    Multicast,
    /// `00:00:00:00:00:00`: no address at all.
    #[error("is all zeros; a NIC needs a real MAC")]
    AllZeros,
}

/// Parses `52:54:00:12:34:56` (either case) as a NIC's MAC: refuses any
/// other syntax, the broadcast and multicast addresses and all zeros.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(MacError::Syntax)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax)?;
    }
    if parts.next().is_some() {
        return Err(MacError::Syntax);
    }
    if mac == [0xff; 6] {
        return Err(MacError::Broadcast);
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast);
    }
    if mac == [0; 6] {
        return Err(MacError::AllZeros);
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            parse_mac("52:54:00:AA:bb:0C"),
            Ok([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c])
        );
        // Locally administered, and a real vendor's (bit 0 clear).
        assert_eq!(parse_mac("02:00:00:00:00:01"), Ok([2, 0, 0, 0, 0, 1]));
        assert_eq!(
            parse_mac("fe:ff:ff:ff:ff:ff"),
            Ok([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff])
        );
    }

    #[test]
    fn bad_syntax_is_refused() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:56:",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:00:zz:34:56",
            "52:54:00:1:34:56",
            "52:54:00:123:34:56",
            "+5:54:00:12:34:56",
            "52:54:00:12:34:+6",
            " 52:54:00:12:34:56",
            "52:54:00:12:34:é",
        ] {
            assert_eq!(parse_mac(bad), Err(MacError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn addresses_no_nic_may_have_are_refused() {
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err(MacError::AllZeros));
        assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), Err(MacError::Broadcast));
        assert_eq!(parse_mac("FF:FF:FF:FF:FF:FF"), Err(MacError::Broadcast));
        for multicast in [
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
            "01:00:00:00:00:00",
        ] {
            assert_eq!(
                parse_mac(multicast),
                Err(MacError::Multicast),
                "{multicast}"
            );
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let says = |s: &str| parse_mac(s).unwrap_err().to_string();
        assert_eq!(
            says("52:54"),
            "is not a MAC address (like \"52:54:00:12:34:56\")"
        );
        assert!(says("00:00:00:00:00:00").contains("all zeros"));
        assert!(says("ff:ff:ff:ff:ff:ff").contains("broadcast"));
        assert!(says("01:00:5e:00:00:01").contains("multicast"));
    }
}
