"""Infrastructure every part uses: errors, shipped resources, atomic outputs, tables."""
