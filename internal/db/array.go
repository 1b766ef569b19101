package db

import "github.com/jackc/pgx/v5/pgtype"

// Array is a one-dimensional PostgreSQL array of vs, bound as one
// parameter in pgx's binary format. A slice given to gorm as it is would
// be spread into a list of parameters, one each; the struct is passed
// through to pgx, which encodes it by the parameter's type. Binary arrays
// are the cheapest way to carry a batch in one statement: no JSON to write
// here nor to parse in PostgreSQL, and no text to parse for the numbers
// and timestamps.
// An empty one has no dimension, as PostgreSQL writes '{}'.
func Array[T any](vs []T) pgtype.Array[T] {
	a := pgtype.Array[T]{Elements: vs, Valid: true}
	if len(vs) > 0 {
		a.Dims = []pgtype.ArrayDimension{{Length: int32(len(vs)), LowerBound: 1}}
	}
	return a
}
