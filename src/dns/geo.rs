//! Pure lookup: an address (the resolver's, or the ECS client subnet) -> answer class and
//! ECS scope. Built once per map from the region networks; read-only afterwards.
//!
//! The networks may nest (a /16 inside a /8 with another answer). At build time they are
//! flattened into disjoint, maximally aggregated blocks: every block is uniform and its parent
//! prefix is not, so the ECS SCOPE of an address inside a block is the block's length. Blocks
//! of the default answer are left implicit (they would be most of the address space); for an
//! address there, SCOPE is one more than its longest common prefix with any explicit block,
//! which is found from the two neighbours in address order. The networks go through a
//! `prefix_trie::PrefixMap` (nesting order, duplicates); a query is one binary search over
//! the blocks, which for disjoint blocks is the longest-prefix match (tested against the
//! trie's own `get_lpm`).

use ipnet::{Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use std::net::IpAddr;

/// Index of an answer class: [`DEFAULT_CLASS`] or a set of regions with the same PoP list.
pub type ClassId = u32;

/// The class for clients outside every region.
pub const DEFAULT_CLASS: ClassId = 0;

/// What the map says for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub class: ClassId,
    /// The shortest prefix of the address under which every address gets the same class.
    pub scope: u8,
}

/// Longest-prefix lookup for both families.
#[derive(Debug, Default)]
pub struct GeoIndex {
    v4: Family<u32>,
    v6: Family<u128>,
}

impl GeoIndex {
    /// `networks`: (network, class); networks must be canonical (no host bits) and unique.
    /// Networks of [`DEFAULT_CLASS`] leave no block but still override their parents.
    pub fn build(networks: &[(ipnet::IpNet, ClassId)]) -> Self {
        // The prefix trie gives the nesting order (parents before children, then by
        // address) and drops exact duplicates; flattening then works on that sequence.
        let mut v4: PrefixMap<Ipv4Net, ClassId> = PrefixMap::new();
        let mut v6: PrefixMap<Ipv6Net, ClassId> = PrefixMap::new();
        for &(net, class) in networks {
            match net {
                ipnet::IpNet::V4(n) => {
                    v4.insert(n.trunc(), class);
                }
                ipnet::IpNet::V6(n) => {
                    v6.insert(n.trunc(), class);
                }
            }
        }
        GeoIndex {
            v4: Family::build(
                v4.iter()
                    .map(|(n, &c)| (u32::from(n.network()), n.prefix_len(), c))
                    .collect(),
            ),
            v6: Family::build(
                v6.iter()
                    .map(|(n, &c)| (u128::from(n.network()), n.prefix_len(), c))
                    .collect(),
            ),
        }
    }

    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Hit {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Explicit (non-default) blocks after flattening, both families.
    pub fn block_count(&self) -> usize {
        self.v4.firsts.len() + self.v6.firsts.len()
    }
}

/// The integer form of an address of one family.
pub trait Bits: Copy + Ord + std::fmt::Debug {
    const WIDTH: u8;
    fn zero() -> Self;
    /// The address with only bit `i` (0 = most significant) set.
    fn bit(i: u8) -> Self;
    fn or(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn leading_zeros_(self) -> u32;
    /// The last address of the prefix `self/len`.
    fn last(self, len: u8) -> Self;
    /// The top 16 bits (`BUCKET_BITS`), as a bucket number.
    fn bucket(self) -> usize;
}

/// Bits of the address that pick a bucket of the lookup index (65,536 buckets).
const BUCKET_BITS: u32 = 16;

/// The same bit operations on both address widths.
macro_rules! impl_bits {
    ($t:ty, $width:expr) => {
        impl Bits for $t {
            const WIDTH: u8 = $width;
            fn zero() -> Self {
                0
            }
            fn bit(i: u8) -> Self {
                1 << (u32::from($width - 1) - u32::from(i))
            }
            fn or(self, o: Self) -> Self {
                self | o
            }
            fn xor(self, o: Self) -> Self {
                self ^ o
            }
            fn bucket(self) -> usize {
                (self >> (u32::from($width) - BUCKET_BITS)) as usize
            }
            fn leading_zeros_(self) -> u32 {
                self.leading_zeros()
            }
            fn last(self, len: u8) -> Self {
                self | <$t>::MAX.checked_shr(u32::from(len)).unwrap_or(0)
            }
        }
    };
}

impl_bits!(u32, 32u8);
impl_bits!(u128, 128u8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block<R> {
    addr: R,
    len: u8,
    class: ClassId,
}

/// The flattened blocks of one family, in address order, as parallel arrays so the binary
/// search touches only the `firsts` array. Being disjoint, the block containing an address
/// is its longest (and only) match.
///
/// `buckets[b]` is the number of blocks that start before bucket `b` (the top 16 address
/// bits), so a lookup searches only the blocks starting in its own bucket: one or two cache
/// lines instead of a dozen on a cold cache (the UDP worker sleeps between queries at
/// moderate load). 256 KiB per family that has blocks.
#[derive(Debug)]
struct Family<R> {
    firsts: Vec<R>,
    lasts: Vec<R>,
    hits: Vec<Hit>,
    buckets: Vec<u32>,
}

impl<R: Bits> Default for Family<R> {
    fn default() -> Self {
        Family {
            firsts: Vec::new(),
            lasts: Vec::new(),
            hits: Vec::new(),
            buckets: Vec::new(),
        }
    }
}

/// `out[b]` = how many of `firsts` (sorted) fall in buckets before `b`, for every bucket
/// and one past the last.
fn bucket_starts<R: Bits>(firsts: &[R]) -> Vec<u32> {
    if firsts.is_empty() {
        return Vec::new();
    }
    let n = 1usize << BUCKET_BITS;
    let mut out = Vec::with_capacity(n + 1);
    let mut i = 0usize;
    for b in 0..=n {
        while i < firsts.len() && firsts[i].bucket() < b {
            i += 1;
        }
        out.push(u32::try_from(i).unwrap_or(u32::MAX));
    }
    out
}

impl<R: Bits> Family<R> {
    /// `nets`: (address, length, class) in trie order (parents first, then by address).
    fn build(mut nets: Vec<(R, u8, ClassId)>) -> Self {
        // Already in this order when it comes from the trie; sorting again is cheap and
        // makes the flattening independent of the trie's iteration order.
        nets.sort_unstable_by_key(|&(a, l, _)| (a, l));
        nets.dedup_by_key(|&mut (a, l, _)| (a, l));
        let mut blocks = Vec::new();
        flatten(R::zero(), 0, DEFAULT_CLASS, &nets, &mut blocks);
        let firsts: Vec<R> = blocks.iter().map(|b| b.addr).collect();
        Family {
            buckets: bucket_starts(&firsts),
            firsts,
            lasts: blocks.iter().map(|b| b.addr.last(b.len)).collect(),
            hits: blocks
                .iter()
                .map(|b| Hit {
                    class: b.class,
                    scope: b.len,
                })
                .collect(),
        }
    }

    #[inline]
    fn lookup(&self, addr: R) -> Hit {
        if self.firsts.is_empty() {
            return Hit {
                class: DEFAULT_CLASS,
                scope: 0,
            };
        }
        // Index of the first block starting after `addr`; the one before may contain it.
        // Blocks starting in earlier buckets start before `addr`, those in later ones after.
        let b = addr.bucket();
        let lo = self.buckets.get(b).map_or(0, |&x| x as usize);
        let hi = self
            .buckets
            .get(b + 1)
            .map_or(self.firsts.len(), |&x| x as usize);
        let i = lo
            + self
                .firsts
                .get(lo..hi)
                .unwrap_or_default()
                .partition_point(|&first| first <= addr);
        let mut common = 0u32;
        if let Some(j) = i.checked_sub(1) {
            if let (Some(&last), Some(&hit)) = (self.lasts.get(j), self.hits.get(j)) {
                if addr <= last {
                    return hit;
                }
                common = last.xor(addr).leading_zeros_();
            }
        }
        // In the implicit default area: the scope must stop short of every explicit block,
        // and the closest ones are the neighbours in address order.
        if let Some(&first) = self.firsts.get(i) {
            common = common.max(first.xor(addr).leading_zeros_());
        }
        Hit {
            class: DEFAULT_CLASS,
            scope: u8::try_from(common + 1).unwrap_or(R::WIDTH).min(R::WIDTH),
        }
    }
}

/// Emits the explicit blocks of prefix `addr/len`, whose covering class is `inherited`, given
/// the networks strictly or exactly inside it (sorted). Recursion depth is at most the width.
fn flatten<R: Bits>(
    addr: R,
    len: u8,
    mut inherited: ClassId,
    mut nets: &[(R, u8, ClassId)],
    out: &mut Vec<Block<R>>,
) {
    if let Some(&(a, l, class)) = nets.first() {
        if a == addr && l == len {
            inherited = class;
            nets = &nets[1..];
        }
    }
    if nets.is_empty() || len >= R::WIDTH {
        if inherited != DEFAULT_CLASS {
            push_merged(
                out,
                Block {
                    addr,
                    len,
                    class: inherited,
                },
            );
        }
        return;
    }
    let hi = addr.or(R::bit(len));
    let split = nets.partition_point(|&(a, _, _)| a < hi);
    flatten(addr, len + 1, inherited, &nets[..split], out);
    flatten(hi, len + 1, inherited, &nets[split..], out);
}

/// Pushes a block, merging it with its sibling while both halves have the same class, so
/// that no two sibling blocks of one class remain (maximal aggregation).
fn push_merged<R: Bits>(out: &mut Vec<Block<R>>, mut b: Block<R>) {
    while b.len > 0 {
        let bit = R::bit(b.len - 1);
        let is_upper_half = b.addr.xor(bit) < b.addr;
        let Some(top) = out.last() else { break };
        if !is_upper_half || top.len != b.len || top.class != b.class || top.addr != b.addr.xor(bit)
        {
            break;
        }
        b = Block {
            addr: top.addr,
            len: b.len - 1,
            class: b.class,
        };
        out.pop();
    }
    out.push(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn idx(nets: &[(&str, ClassId)]) -> GeoIndex {
        let nets: Vec<_> = nets
            .iter()
            .map(|(n, c)| (n.parse().expect("net"), *c))
            .collect();
        GeoIndex::build(&nets)
    }

    fn hit(i: &GeoIndex, a: &str) -> (ClassId, u8) {
        let h = i.lookup(a.parse().expect("addr"));
        (h.class, h.scope)
    }

    #[test]
    fn an_empty_map_answers_default_with_scope_zero() {
        let i = idx(&[]);
        assert_eq!(hit(&i, "192.0.2.1"), (DEFAULT_CLASS, 0));
        assert_eq!(hit(&i, "2001:db8::1"), (DEFAULT_CLASS, 0));
    }

    #[test]
    fn nested_networks_get_scopes_that_never_cover_a_different_answer() {
        let i = idx(&[("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.0/24", 1)]);
        assert_eq!(hit(&i, "10.1.2.3"), (1, 24));
        assert_eq!(hit(&i, "10.1.3.3"), (2, 24));
        assert_eq!(hit(&i, "10.1.0.1"), (2, 23));
        assert_eq!(hit(&i, "10.200.0.1"), (1, 9));
        assert_eq!(hit(&i, "10.0.0.1"), (1, 16));
        assert_eq!(hit(&i, "11.0.0.1"), (DEFAULT_CLASS, 8));
        assert_eq!(hit(&i, "200.0.0.1"), (DEFAULT_CLASS, 1));
    }

    #[test]
    fn a_default_answered_network_inside_a_region_is_carved_out() {
        let i = idx(&[("10.0.0.0/8", 1), ("10.1.0.0/16", DEFAULT_CLASS)]);
        assert_eq!(hit(&i, "10.1.2.3"), (DEFAULT_CLASS, 16));
        assert_eq!(hit(&i, "10.2.0.0"), (1, 15));
    }

    #[test]
    fn sibling_networks_of_one_class_aggregate() {
        let i = idx(&[("192.0.2.0/25", 1), ("192.0.2.128/25", 1)]);
        assert_eq!(hit(&i, "192.0.2.200"), (1, 24));
    }

    #[test]
    fn the_bucket_index_holds_at_both_ends_of_the_address_space() {
        let i = idx(&[
            ("0.0.0.0/24", 1),
            ("0.0.1.0/24", 2),
            ("255.254.0.0/15", 3),
            ("255.255.255.0/24", 1),
        ]);
        assert_eq!(hit(&i, "0.0.0.0"), (1, 24));
        assert_eq!(hit(&i, "0.0.1.255"), (2, 24));
        assert_eq!(hit(&i, "0.0.2.0").0, DEFAULT_CLASS);
        assert_eq!(hit(&i, "255.254.0.1"), (3, 16));
        assert_eq!(hit(&i, "255.255.254.255"), (3, 24));
        assert_eq!(hit(&i, "255.255.255.255"), (1, 24));
        let v6 = GeoIndex::build(&[("ffff:ffff::/32".parse().expect("net"), 2)]);
        assert_eq!(v6.lookup("ffff:ffff::1".parse().expect("ip")).class, 2);
        assert_eq!(
            v6.lookup("ffff:fffe::1".parse().expect("ip")).class,
            DEFAULT_CLASS
        );
    }

    #[test]
    fn lookups_agree_with_the_prefix_tries_longest_match() {
        let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        let mut nets = Vec::new();
        let mut oracle: PrefixMap<Ipv4Net, ClassId> = PrefixMap::new();
        for _ in 0..400 {
            let len = 8 + (next() % 25) as u8;
            let n = Ipv4Net::new(Ipv4Addr::from(next() as u32 & 0x0fff_ffff), len)
                .expect("net")
                .trunc();
            let class = (next() % 4) as ClassId;
            if oracle.get(&n).is_none() {
                oracle.insert(n, class);
                nets.push((ipnet::IpNet::V4(n), class));
            }
        }
        let i = GeoIndex::build(&nets);
        for _ in 0..20_000 {
            let a = Ipv4Addr::from(next() as u32 & 0x1fff_ffff);
            let want = oracle
                .get_lpm(&Ipv4Net::new(a, 32).expect("host"))
                .map_or(DEFAULT_CLASS, |(_, c)| *c);
            let covering: Vec<_> = nets
                .iter()
                .filter(|(n, _)| n.contains(&IpAddr::V4(a)))
                .collect();
            assert_eq!(i.lookup(IpAddr::V4(a)).class, want, "{a} in {covering:?}");
        }
    }

    #[test]
    fn scopes_match_a_brute_force_check() {
        let nets = [
            ("10.0.0.0/8", 1),
            ("10.0.0.0/9", 2),
            ("10.0.0.0/10", 1),
            ("10.64.0.0/10", 3),
            ("10.128.0.0/16", 2),
            ("10.130.7.0/24", 1),
        ];
        let i = idx(&nets);
        let parsed: Vec<(Ipv4Net, ClassId)> = nets
            .iter()
            .map(|(n, c)| (n.parse().expect("net"), *c))
            .collect();
        let class_of = |a: u32| {
            parsed
                .iter()
                .filter(|(n, _)| n.contains(&Ipv4Addr::from(a)))
                .max_by_key(|(n, _)| n.prefix_len())
                .map_or(DEFAULT_CLASS, |(_, c)| *c)
        };
        // Samples: every /16 in 10/8 and around it, with a few host offsets.
        for hi in (9u32 << 8)..(12u32 << 8) {
            for lo in [0u32, 7 << 8, 0xffff] {
                let a = (hi << 16) | lo;
                let h = i.lookup(IpAddr::V4(Ipv4Addr::from(a)));
                assert_eq!(h.class, class_of(a), "{}", Ipv4Addr::from(a));
                // Uniform under the scope (checked on a sample of addresses)...
                let first = a & u32::MAX.checked_shl(32 - u32::from(h.scope)).unwrap_or(0);
                let last = first | u32::MAX.checked_shr(u32::from(h.scope)).unwrap_or(0);
                let step = ((last - first) / 4096).max(1);
                let mut x = first;
                while x <= last && x >= first {
                    assert_eq!(
                        class_of(x),
                        h.class,
                        "scope {} of {}",
                        h.scope,
                        Ipv4Addr::from(a)
                    );
                    x = match x.checked_add(step) {
                        Some(n) => n,
                        None => break,
                    };
                }
            }
        }
    }
}
