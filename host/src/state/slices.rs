//! A Service's EndpointSlices by name.

/// Sorted by name. Almost always one slice: a `BTreeMap` of one allocated
/// a whole node with room for eleven (~5 MB of the heap at 10k Services).
#[derive(Debug)]
pub struct BySlice<T>(Vec<(String, T)>);

impl<T> Default for BySlice<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> BySlice<T> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn insert(&mut self, name: String, value: T) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (name, value));
            }
        }
    }

    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In name order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }
}
