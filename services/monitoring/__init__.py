"""Live model quality from what production sent: accuracy from feedback labels."""
