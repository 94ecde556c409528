//! Sticky canary split (SPEC §5): a client's key is hashed with the route's name into a bucket
//! 0..9999; buckets below `split × 100` go to `to`. The hash is fixed (FNV-1a, then a 64-bit
//! finaliser for avalanche) so every replica and every restart puts a client on the same side,
//! and raising the percentage only moves clients from `default` to `to`.

use std::borrow::Cow;

use crate::router::{Split, Sticky};

/// Number of buckets.
pub const BUCKETS: u32 = 10_000;

/// The bucket of `key` on route `route`.
pub fn bucket(route: &str, key: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in route.as_bytes().iter().chain(&[0xff]).chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone clusters similar keys.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(BUCKETS)) as u32
}

/// A split's percentage in JSON (`GET /routes`, the audit trail): a whole number is written
/// as one, `10` as the file has it rather than `10.0`; a fraction stays a fraction.
pub fn percent_json(percent: f64) -> serde_json::Value {
    if percent.fract() == 0.0 && (0.0..=100.0).contains(&percent) {
        serde_json::Value::from(percent as u64)
    } else {
        serde_json::Value::from(percent)
    }
}

/// [`percent_json`] for serde's `serialize_with`.
pub fn serialize_percent<S: serde::Serializer>(
    percent: &Option<f64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&percent.map(percent_json), s)
}

/// The sticky key of a request: the client's address (its 4 or 16 bytes), a header's value, or
/// a cookie's value — borrowed from the request where it can be. `None` when the request
/// carries none (the split then picks at random).
pub fn sticky_key<'a>(
    sticky: &Sticky,
    headers: &'a http::HeaderMap,
    client_ip: Option<std::net::IpAddr>,
) -> Option<Cow<'a, [u8]>> {
    match sticky {
        Sticky::Ip => client_ip.map(|ip| match ip {
            std::net::IpAddr::V4(a) => Cow::Owned(a.octets().to_vec()),
            std::net::IpAddr::V6(a) => Cow::Owned(a.octets().to_vec()),
        }),
        Sticky::Header(h) => headers
            .get(h)
            .filter(|v| !v.is_empty())
            .map(|v| Cow::Borrowed(v.as_bytes())),
        Sticky::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .find_map(|c| crate::forwarding::cookie_value(c.as_bytes(), name))
            // A cleared cookie (`cid=`) is no key, as an empty header is: otherwise every
            // client without one would share a bucket.
            .filter(|v| !v.is_empty())
            .map(Cow::Borrowed),
    }
}

/// Whether a request with this sticky key goes to the route's `to` under `split`.
pub fn decide(route_name: &str, split: &Split, key: Option<&[u8]>) -> bool {
    let b = key.map_or_else(random_bucket, |k| bucket(route_name, k));
    goes_to_target(b, split.threshold)
}

/// A random bucket, for a request without a sticky key.
pub fn random_bucket() -> u32 {
    use rand::Rng;
    rand::thread_rng().gen_range(0..BUCKETS)
}

/// Whether a bucket goes to `to` under a split with this threshold (`split × 100`).
pub fn goes_to_target(bucket: u32, threshold: u32) -> bool {
    bucket < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_percentages_are_written_as_whole_numbers() {
        assert_eq!(percent_json(10.0).to_string(), "10");
        assert_eq!(percent_json(0.0).to_string(), "0");
        assert_eq!(percent_json(100.0).to_string(), "100");
        assert_eq!(percent_json(12.5).to_string(), "12.5");
        assert_eq!(percent_json(0.01).to_string(), "0.01");
    }

    #[test]
    fn a_cookie_key_is_found_beside_a_cookie_with_raw_utf8() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_bytes("lang=français; cid=abc".as_bytes()).unwrap(),
        );
        let key = sticky_key(&Sticky::Cookie("cid".into()), &h, None);
        assert_eq!(key.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn stable_and_spread() {
        assert_eq!(bucket("tours", b"client-1"), bucket("tours", b"client-1"));
        let n = 20_000;
        let under_10 = (0..n)
            .filter(|i| bucket("tours", format!("10.0.{}.{}", i / 256, i % 256).as_bytes()) < 1000)
            .count();
        let share = under_10 as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
    }

    #[test]
    fn routes_split_independently() {
        let same = (0..1000)
            .filter(|i| {
                let k = format!("c{i}");
                (bucket("a", k.as_bytes()) < 5000) == (bucket("b", k.as_bytes()) < 5000)
            })
            .count();
        assert!((400..600).contains(&same), "{same}");
    }

    #[test]
    fn an_empty_header_or_cookie_is_no_key() {
        let mut h = http::HeaderMap::new();
        h.insert("x-client-id", "".parse().unwrap());
        h.insert(http::header::COOKIE, "a=1; cid=; b=2".parse().unwrap());
        let header = Sticky::Header(http::HeaderName::from_static("x-client-id"));
        let cookie = Sticky::Cookie("cid".into());
        assert_eq!(sticky_key(&header, &h, None), None);
        assert_eq!(sticky_key(&cookie, &h, None), None);
        h.insert(http::header::COOKIE, "cid=k1".parse().unwrap());
        assert_eq!(sticky_key(&cookie, &h, None).as_deref(), Some(&b"k1"[..]));
    }
}
