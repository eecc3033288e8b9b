"""Built-in merge methods, one module per method or family; each module registers its methods
on import, and every module in this package is imported when the registry is first used."""
