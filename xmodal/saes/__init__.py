"""SAEs via sae-lens, mapped onto decoder layers."""
