//! The few netlink requests the network of its own needs, spoken from Rust instead of
//! exec'ing `ip` and `nft` (each exec costs milliseconds of CPU that land on the starts that
//! follow): links (the bridge, veth pairs, up and down), addresses, and whether graven's
//! nftables table is there.
//!
//! A netlink socket belongs to the network namespace its opener was in when it opened it, and
//! keeps speaking to it after the opener leaves: that is how the filler configures a new
//! namespace's links from outside it. Nothing here enters a namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols};

/// Loopback's index, the same in every network namespace.
pub const LOOPBACK: u32 = 1;

/// A route netlink socket, bound to the network namespace it was opened in.
pub struct Route {
    socket: Socket,
    sequence: u32,
}

impl Route {
    /// Opens a socket on the calling thread's network namespace.
    pub fn open() -> io::Result<Route> {
        let socket = connect(protocols::NETLINK_ROUTE)?;
        Ok(Route {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and reads until its acknowledgement; returns the messages that came
    /// before it (the answer to a get).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        let mut answers = Vec::new();
        loop {
            let (received, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < received.len() {
                let answer =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&received[offset..])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(answers),
                            Some(_) => Err(error.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                    _ => {}
                }
            }
        }
    }

    /// The index of the link called `name`, if there is one.
    pub fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(message), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip link add NAME type bridge`.
    pub fn add_bridge(&mut self, name: &str) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        self.request(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// `ip link add NAME master CONTROLLER up type veth peer name PEER netns NETNS`: one
    /// request makes the pair, moves its peer and plugs this side into the bridge.
    pub fn add_veth(
        &mut self,
        name: &str,
        controller: u32,
        peer: &str,
        netns: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut inside = LinkMessage::default();
        inside.attributes = vec![
            LinkAttribute::IfName(peer.to_owned()),
            LinkAttribute::NetNsFd(netns.as_raw_fd()),
        ];
        let mut message = LinkMessage::default();
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        message.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::Controller(controller),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(inside))),
            ]),
        ];
        self.request(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// `ip link set INDEX up`.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(message), 0)
            .map(drop)
    }

    /// `ip link del NAME`.
    pub fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        self.request(RouteNetlinkMessage::DelLink(message), 0)
            .map(drop)
    }

    /// `ip addr replace IP/PREFIX dev INDEX`.
    pub fn replace_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix;
        message.header.index = index;
        let broadcast = Ipv4Addr::from(u32::from(ip) | (u32::MAX >> prefix));
        message.attributes = vec![
            AddressAttribute::Local(ip.into()),
            AddressAttribute::Address(ip.into()),
            AddressAttribute::Broadcast(broadcast),
        ];
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// `ip addr del IP/PREFIX dev INDEX`.
    pub fn delete_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix;
        message.header.index = index;
        message.attributes = vec![
            AddressAttribute::Local(ip.into()),
            AddressAttribute::Address(ip.into()),
        ];
        self.request(RouteNetlinkMessage::DelAddress(message), 0)
            .map(drop)
    }
}

fn connect(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Whether the nftables table `ip NAME` exists: a `NFT_MSG_GETTABLE` (a few hundred bytes
/// each way) instead of running `nft list table`. Written by hand: no crate speaks
/// nftables' netlink without linking libnftnl, and this is one message.
pub fn nft_table_exists(name: &str) -> io::Result<bool> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFPROTO_IPV4: u8 = 2;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    let socket = connect(protocols::NETLINK_NETFILTER)?;
    let attribute_len = 4 + name.len() + 1;
    let total = 16 + 4 + attribute_len.next_multiple_of(4);
    let mut request = Vec::with_capacity(total);
    request.extend_from_slice(&(total as u32).to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: the family, version 0, resource id 0.
    request.extend_from_slice(&[NFPROTO_IPV4, 0, 0, 0]);
    request.extend_from_slice(&(attribute_len as u16).to_ne_bytes());
    request.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    request.extend_from_slice(name.as_bytes());
    request.resize(total, 0);
    socket.send(&request, 0)?;
    let mut found = false;
    loop {
        let (received, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset + 16 <= received.len() {
            let field = |at: usize, len: usize| &received[offset + at..offset + at + len];
            let length = u32::from_ne_bytes(field(0, 4).try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(field(4, 2).try_into().unwrap_or_default());
            if length < 16 || offset + length > received.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a truncated netfilter netlink answer",
                ));
            }
            match kind {
                NLMSG_ERROR if length >= 20 => {
                    let code = i32::from_ne_bytes(field(16, 4).try_into().unwrap_or_default());
                    return match -code {
                        0 => Ok(found),
                        libc::ENOENT => Ok(false),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    };
                }
                NLMSG_DONE => return Ok(found),
                k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => found = true,
                _ => {}
            }
            offset += length.next_multiple_of(4);
        }
    }
}
