"""Images in: fetched (with an address policy), decoded safely and resized as the processor would."""
