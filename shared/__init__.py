"""What every termtune service needs: settings, messages, bus, store, job records."""
