//! Queue allocation for clustering groups: deterministic, average, over sorted instance ids.
//!
//! Every host computing the allocation from the same live set gets the same answer, so a
//! rebalance needs no coordination: the first `queues % instances` instances take one extra queue.

use std::ops::Range;

/// The queue ids (of `queues`) that instance number `index` of `instances` (sorted) owns.
pub fn average_share(queues: u32, instances: usize, index: usize) -> Range<u32> {
    if instances == 0 || index >= instances {
        return 0..0;
    }
    let n = instances as u32;
    let i = index as u32;
    let base = queues / n;
    let extra = queues % n;
    let start = i * base + i.min(extra);
    let len = base + u32::from(i < extra);
    start..start + len
}

/// Owner of queue `queue_id` among `sorted_instances`, or `None` when there is none.
pub fn owner_of<'a>(queue_id: u32, queues: u32, sorted_instances: &[&'a str]) -> Option<&'a str> {
    (0..sorted_instances.len())
        .find(|&i| average_share(queues, sorted_instances.len(), i).contains(&queue_id))
        .map(|i| sorted_instances[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_has_exactly_one_owner() {
        for queues in 1..20u32 {
            for instances in 1..12usize {
                let mut seen = vec![0u32; queues as usize];
                let mut sizes = Vec::new();
                for i in 0..instances {
                    let r = average_share(queues, instances, i);
                    sizes.push(r.len());
                    for q in r {
                        seen[q as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{queues} over {instances}");
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "balanced: {sizes:?}");
            }
        }
    }

    #[test]
    fn first_instances_take_the_remainder() {
        assert_eq!(average_share(8, 3, 0), 0..3);
        assert_eq!(average_share(8, 3, 1), 3..6);
        assert_eq!(average_share(8, 3, 2), 6..8);
        assert_eq!(average_share(2, 4, 3), 2..2);
        assert_eq!(average_share(8, 0, 0), 0..0);
        let ids = ["a", "b", "c"];
        assert_eq!(owner_of(7, 8, &ids), Some("c"));
        assert_eq!(owner_of(0, 1, &ids), Some("a"));
        assert_eq!(owner_of(0, 1, &[]), None);
    }
}
