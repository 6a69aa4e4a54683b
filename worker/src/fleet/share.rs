//! Which of its pool's Leases a fleet pod should hold: pure decisions, tested without a cluster.
//!
//! Every live member aims at a fair share, `ceil(accounts / members)`. A pod over it hands
//! Leases over (the planned-release path: quiesce, release, stay away one lease duration); a
//! pod under it takes free or expired Leases. Which ones follows rendezvous hashing (highest
//! random weight, as in timebertt/kubernetes-controller-sharding's ring): each account has a
//! preferred member among the live ones, so pods seldom race for the same Lease and a pod that
//! joins or leaves moves few numbers. A Lease that stays free for a few rounds (its preferred
//! pod is full) goes to any pod under its share.

use std::hash::{DefaultHasher, Hash, Hasher};

/// Rounds a Lease must look free before a pod that is not its preferred member takes it.
pub const FREE_ROUNDS_BEFORE_ANYONE: u32 = 2;

/// One account of the pool as this pod sees it this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub account: String,
    /// This pod holds the Lease (and may act under it).
    pub held: bool,
    /// Nobody holds it, or its holder's record expired, and this pod is not holding off.
    pub free: bool,
    /// Consecutive rounds it has looked free.
    pub free_rounds: u32,
    /// Consecutive rounds this pod has held it.
    pub held_rounds: u32,
}

/// Rounds a Lease is held before it may be handed over again (so a number just taken is not
/// bounced straight back).
pub const SETTLE_ROUNDS: u32 = 5;

/// What to do this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Accounts whose Lease this pod may take.
    pub take: Vec<String>,
    /// Accounts whose Lease this pod hands over.
    pub release: Vec<String>,
}

/// The fair share: `ceil(accounts / members)`.
pub fn fair_share(accounts: usize, members: usize) -> usize {
    accounts.div_ceil(members.max(1))
}

/// The weight of `member` for `account`; the highest weight among live members wins.
pub fn weight(account: &str, member: &str) -> u64 {
    // DefaultHasher is SipHash with fixed keys: the same in every pod of one image, which is
    // all that is needed (pods of two versions during an upgrade only race a little more).
    let mut h = DefaultHasher::new();
    account.hash(&mut h);
    member.hash(&mut h);
    h.finish()
}

/// The member an account prefers.
pub fn preferred<'a>(account: &str, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| (weight(account, m), m.as_str()))
        .map(String::as_str)
}

/// Decide this round's takes and releases for `me`, given how many of the pool's Leases each
/// live member holds (`held_by`, from the round's list). At most `max_release` Leases are
/// handed over per round, so a join moves numbers gradually.
///
/// A pod holds at most `share + 1`: it takes below its share, and takes a Lease nobody took
/// for a few rounds up to `share + 1` (after `kubectl whatsapp release`, say, when every other
/// pod is at its share). It hands over above `share + 1`, or above its share while a live
/// member holds fewer than `floor(numbers / members)` (a pod that joined, or one that just
/// released), Leases it has held a while first.
pub fn plan(
    me: &str,
    members: &[String],
    views: &[LeaseView],
    held_by: &std::collections::BTreeMap<String, usize>,
    max_release: usize,
) -> Plan {
    let share = fair_share(views.len(), members.len());
    let floor = views.len() / members.len().max(1);
    let count = |m: &String| held_by.get(m).copied().unwrap_or(0);
    // Someone is short of the floor: pods over their share hand numbers over.
    let short = members.iter().any(|m| m != me && count(m) < floor);
    // Someone is more than one short (a pod that joined; one short is what a `release`
    // leaves): pods at their share leave free Leases to it.
    let starved = members.iter().any(|m| m != me && count(m) + 1 < floor);
    let held: Vec<&LeaseView> = views.iter().filter(|v| v.held).collect();
    let mut out = Plan::default();
    let keep = if short { share } else { share + 1 };
    if held.len() > keep {
        // Hand over first what was not just taken, then what prefers another member, lowest
        // weight for us first.
        let mut by_fit: Vec<&&LeaseView> = held.iter().collect();
        by_fit.sort_by_key(|v| {
            (
                v.held_rounds < SETTLE_ROUNDS,
                preferred(&v.account, members) == Some(me),
                weight(&v.account, me),
            )
        });
        out.release = by_fit
            .iter()
            .take((held.len() - keep).min(max_release))
            .map(|v| v.account.clone())
            .collect();
        return out;
    }
    let mut candidates: Vec<&LeaseView> = views
        .iter()
        .filter(|v| !v.held && v.free)
        .filter(|v| {
            let stale = v.free_rounds >= FREE_ROUNDS_BEFORE_ANYONE;
            (held.len() < share && (preferred(&v.account, members) == Some(me) || stale))
                || (held.len() < share + 1 && stale && !starved)
        })
        .collect();
    candidates.sort_by_key(|v| {
        (
            preferred(&v.account, members) != Some(me),
            std::cmp::Reverse(weight(&v.account, me)),
        )
    });
    let room = if held.len() < share {
        share - held.len()
    } else {
        1
    };
    out.take = candidates
        .into_iter()
        .take(room)
        .map(|v| v.account.clone())
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gw-{i}")).collect()
    }

    fn accounts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ns/line-{i}")).collect()
    }

    /// Run rounds of every member against a shared holder map until nothing changes; Leases
    /// a member releases become free the next round, as after a planned handover.
    fn settle(
        members: &[String],
        holders: &mut std::collections::BTreeMap<String, String>,
        all: &[String],
    ) {
        let mut free_rounds: std::collections::BTreeMap<String, u32> = Default::default();
        for _ in 0..100 {
            let mut changed = false;
            for me in members {
                let views: Vec<LeaseView> = all
                    .iter()
                    .map(|a| LeaseView {
                        account: a.clone(),
                        held: holders.get(a) == Some(me),
                        free: !holders.contains_key(a),
                        free_rounds: free_rounds.get(a).copied().unwrap_or(0),
                        held_rounds: SETTLE_ROUNDS,
                    })
                    .collect();
                let mut held_by = std::collections::BTreeMap::new();
                for h in holders.values() {
                    *held_by.entry(h.clone()).or_default() += 1;
                }
                let p = plan(me, members, &views, &held_by, 8);
                for a in p.release {
                    holders.remove(&a);
                    changed = true;
                }
                for a in p.take {
                    holders.insert(a, me.clone());
                    changed = true;
                }
            }
            for a in all {
                let f = free_rounds.entry(a.clone()).or_default();
                *f = if holders.contains_key(a) { 0 } else { *f + 1 };
            }
            if !changed && holders.len() == all.len() {
                return;
            }
        }
        panic!("did not settle: {holders:?}");
    }

    fn shares(
        members: &[String],
        holders: &std::collections::BTreeMap<String, String>,
    ) -> Vec<usize> {
        members
            .iter()
            .map(|m| holders.values().filter(|h| *h == m).count())
            .collect()
    }

    #[test]
    fn thirty_numbers_on_three_pods_settle_at_ten_each() {
        let (m, a) = (members(3), accounts(30));
        let mut holders = Default::default();
        settle(&m, &mut holders, &a);
        assert_eq!(shares(&m, &holders), vec![10, 10, 10]);
    }

    #[test]
    fn a_fourth_pod_takes_a_fair_share_and_moves_only_that() {
        let (m3, a) = (members(3), accounts(30));
        let mut holders = Default::default();
        settle(&m3, &mut holders, &a);
        let before = holders.clone();
        let m4 = members(4);
        settle(&m4, &mut holders, &a);
        let s = shares(&m4, &holders);
        assert!(s.iter().all(|n| (6..=8).contains(n)), "{s:?}");
        let moved = a
            .iter()
            .filter(|x| before.get(*x) != holders.get(*x))
            .count();
        assert!(moved <= 8, "only the new pod's share moves, moved {moved}");
    }

    #[test]
    fn survivors_take_a_dead_pods_numbers() {
        let (m3, a) = (members(3), accounts(30));
        let mut holders = Default::default();
        settle(&m3, &mut holders, &a);
        holders.retain(|_, h| h != "gw-2");
        let m2 = members(2);
        settle(&m2, &mut holders, &a);
        assert_eq!(shares(&m2, &holders), vec![15, 15]);
    }

    #[test]
    fn a_pod_over_its_share_releases_at_most_max_per_round_and_nothing_under_it() {
        let m = members(2);
        let views: Vec<LeaseView> = accounts(20)
            .into_iter()
            .map(|account| LeaseView {
                account,
                held: true,
                free: false,
                free_rounds: 0,
                held_rounds: SETTLE_ROUNDS,
            })
            .collect();
        let held_by = [("gw-0".to_string(), 20)].into_iter().collect();
        let p = plan("gw-0", &m, &views, &held_by, 4);
        assert_eq!(p.release.len(), 4);
        assert!(p.take.is_empty());
        let at_share: Vec<LeaseView> = views
            .iter()
            .enumerate()
            .map(|(i, v)| LeaseView {
                held: i < 10,
                ..v.clone()
            })
            .collect();
        let held_by = [("gw-0".to_string(), 10), ("gw-1".to_string(), 10)]
            .into_iter()
            .collect();
        let p = plan("gw-0", &m, &at_share, &held_by, 4);
        assert_eq!(p, Plan::default(), "at its share: nothing to do");
    }

    #[test]
    fn a_released_number_finds_a_pod_even_when_every_other_pod_is_at_its_share() {
        let (m, a) = (members(3), accounts(30));
        let mut holders = Default::default();
        settle(&m, &mut holders, &a);
        // `kubectl whatsapp release`: the holder gives one up and stays away from it.
        let (released, by) = holders
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .expect("held");
        holders.remove(&released);
        let others: Vec<String> = m.iter().filter(|x| **x != by).cloned().collect();
        let mut held_by: std::collections::BTreeMap<String, usize> = Default::default();
        for h in holders.values() {
            *held_by.entry(h.clone()).or_default() += 1;
        }
        let takers: Vec<&String> = others
            .iter()
            .filter(|me| {
                let views: Vec<LeaseView> = a
                    .iter()
                    .map(|x| LeaseView {
                        account: x.clone(),
                        held: holders.get(x) == Some(*me),
                        free: *x == released,
                        free_rounds: if *x == released {
                            FREE_ROUNDS_BEFORE_ANYONE
                        } else {
                            0
                        },
                        held_rounds: SETTLE_ROUNDS,
                    })
                    .collect();
                plan(me, &m, &views, &held_by, 8).take.contains(&released)
            })
            .collect();
        assert!(!takers.is_empty(), "nobody takes a released number");
        // The one that took it (11 = share + 1) keeps it while nobody is starved.
        let me = takers[0].clone();
        holders.insert(released.clone(), me.clone());
        *held_by.entry(me.clone()).or_default() += 1;
        let views: Vec<LeaseView> = a
            .iter()
            .map(|x| LeaseView {
                account: x.clone(),
                held: holders.get(x) == Some(&me),
                free: false,
                free_rounds: 0,
                held_rounds: if *x == released { 0 } else { SETTLE_ROUNDS },
            })
            .collect();
        // The releaser is one short, so the taker hands over another number, never the one it
        // just took.
        let p = plan(&me, &m, &views, &held_by, 8);
        assert_eq!(p.release.len(), 1);
        assert_ne!(
            p.release[0], released,
            "no ping-pong of the released number"
        );
    }

    #[test]
    fn a_free_lease_goes_first_to_its_preferred_member() {
        let m = members(3);
        let a = "ns/line-7".to_string();
        let winner = preferred(&a, &m).expect("members").to_string();
        for me in &m {
            let views = vec![LeaseView {
                account: a.clone(),
                held: false,
                free: true,
                free_rounds: 0,
                held_rounds: 0,
            }];
            let p = plan(me, &m, &views, &Default::default(), 8);
            assert_eq!(p.take.contains(&a), *me == winner, "{me}");
        }
    }
}
