//! The end of every run: a human table on stdout, then exactly one JSON line.

use serde_json::{Map, Value};

/// A run's report, printed at the end.
pub struct Report {
    heading: String,
    rows: Vec<(String, String)>,
    fields: Map<String, Value>,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("scenario".to_owned(), Value::from(scenario));
        Report {
            heading: scenario.to_owned(),
            rows: Vec::new(),
            fields,
        }
    }

    /// The table's first line.
    pub fn heading(&mut self, heading: String) {
        self.heading = heading;
    }

    /// One line of the table.
    pub fn row(&mut self, label: &str, value: impl std::fmt::Display) {
        self.rows.push((label.to_owned(), value.to_string()));
    }

    /// One field of the JSON line.
    pub fn field(&mut self, key: &str, value: Value) {
        self.fields.insert(key.to_owned(), value);
    }

    /// Prints the table, then the JSON line.
    pub fn print(self) {
        println!("{}", self.heading);
        for (label, value) in &self.rows {
            println!("  {label:<46}{value}");
        }
        println!("{}", Value::Object(self.fields));
    }
}
