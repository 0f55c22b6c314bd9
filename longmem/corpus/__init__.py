"""The broad adaptation corpus (docs/data.md): its sources, text cleaning, package fetching and the ICL overlap check."""
