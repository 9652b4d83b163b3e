//! A map of keys the agent keeps equal to a set it computes.
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};

use super::{CaptureError, map_err, take_map};

/// A map of keys (each with the value 1) that the agent keeps equal to a
/// set it computes from the configuration, and the set it last wrote.
pub struct KeySet<K> {
    map: BpfHashMap<MapData, K, u32>,
    held: std::collections::HashSet<K>,
    name: &'static str,
}

impl<K: aya::Pod + Eq + std::hash::Hash> KeySet<K> {
    /// Takes map `name` out of the loaded object.
    pub fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, CaptureError> {
        let map = BpfHashMap::try_from(take_map(ebpf, name)?).map_err(map_err(name))?;
        Ok(Self { map, held: Default::default(), name })
    }

    /// Adds what `want` has and the map lacks, removes the rest.
    pub fn sync(&mut self, want: std::collections::HashSet<K>) -> Result<(), CaptureError> {
        for k in want.difference(&self.held) {
            self.map.insert(*k, 1, 0).map_err(map_err(self.name))?;
        }
        for k in self.held.difference(&want) {
            let _ = self.map.remove(k);
        }
        self.held = want;
        Ok(())
    }
}
